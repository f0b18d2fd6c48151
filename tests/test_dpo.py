"""DPOModule: response labels, the first loss, K-wise vs pairwise, micro-batches, cached and LoRA references."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_rlhf import HFExport, LoRAQuantization, LoraSpec, ModelSpec, PreemptionCheckpoint
from lit_rlhf.datamodules import PreferenceDataModule
from lit_rlhf.datamodules.base import write_jsonl
from lit_rlhf.hf import load_model, load_tokenizer
from lit_rlhf.hf.forwards import completion_logprobs
from lit_rlhf.loggers import CSVLogger
from lit_rlhf.models import DPOModule
from lit_rlhf.quickstart.task import ranking_examples
from lit_rlhf.rlhf.losses import IGNORE_INDEX
from tests.helpers import cpu_trainer
from tests.test_preemption import assert_same_rows, read_log

ROWS = [
    {
        "prompt": "The phone was",
        "responses": [" great.", " awful and slow.", " fine.", " ok I guess."],
        "ranking": [0, [2, 3], 1],
    },
    {"prompt": "The hotel was", "chosen": " lovely, I enjoyed it.", "rejected": " dirty."},
    {"prompt": "My lunch was", "responses": [" tasty.", " cold.", " bland."], "ranking": [0, 2, 1]},
]


@pytest.fixture
def rankings(tmp_path):
    return write_jsonl(tmp_path / "rank.jsonl", ranking_examples(16, seed=3))


def data_module(tokenizer, path, batch_size=4, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(str(path), batch_size=batch_size, max_length=64, **kwargs)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return dm


def built(module: DPOModule) -> DPOModule:
    module.configure_model()
    return module


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


# ---- data ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
def test_preference_batches_label_each_response_and_its_eos(tiny_tokenizer, tmp_path, side):
    tok = tiny_tokenizer
    dm = data_module(tok, write_jsonl(tmp_path / "rows.jsonl", ROWS), padding_side=side)
    batch = dm.collate(dm.train_dataset)
    k = batch["ranks"].shape[1]
    texts = [(r["prompt"], resp) for r in ROWS for resp in (r.get("responses") or [r["chosen"], r["rejected"]])]
    slots = [b * k + i for b, r in enumerate(ROWS) for i in range(len(r.get("responses") or [0, 0]))]
    assert batch["labels"].shape == batch["input_ids"].shape
    for slot, (prompt, response) in zip(slots, texts):
        labelled = batch["labels"][slot][batch["labels"][slot] != IGNORE_INDEX].tolist()
        assert labelled == tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        real = batch["attention_mask"][slot].bool()
        prompt_len = len(tok(prompt)["input_ids"])
        assert (batch["labels"][slot][real][:prompt_len] == IGNORE_INDEX).all()
    padded_slots = [s for s in range(batch["labels"].shape[0]) if s not in slots]
    assert padded_slots and (batch["labels"][padded_slots] == IGNORE_INDEX).all()


def test_chat_preference_labels_start_after_the_generation_prompt(tiny_tokenizer, tmp_path):
    row = {
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}],
    }
    tok = tiny_tokenizer
    dm = data_module(tok, write_jsonl(tmp_path / "chat.jsonl", [row]))
    batch = dm.collate(dm.train_dataset)
    prompt = tok.apply_chat_template(row["chosen"][:1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(row["chosen"], tokenize=False)
    labelled = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert tok.decode(labelled) == full[len(prompt) :] or tok.decode(labelled[:-1]) == full[len(prompt) :]
    assert labelled[-1] == tok.eos_token_id


# ---- loss ---------------------------------------------------------------------------------------------------
def test_first_step_loss_is_log_two_with_a_frozen_copy_as_reference(tiny_model_dir, tiny_tokenizer, rankings):
    module = built(DPOModule(ModelSpec(str(tiny_model_dir)), beta=0.1))
    assert module.reference is not None and not any(p.requires_grad for p in module.reference.parameters())
    batch = data_module(module.tokenizer, rankings).collate(data_module(module.tokenizer, rankings).train_dataset[:4])
    loss_sum, stats = module._loss_terms(batch)
    assert stats["prompts"] == 4 and stats["pairs"] > 4
    torch.testing.assert_close(loss_sum / stats["prompts"], torch.tensor(math.log(2)), atol=1e-6, rtol=0)
    assert stats["chosen_sum"].abs() < 1e-5 and stats["rejected_sum"].abs() < 1e-5


def test_rpo_adds_alpha_times_the_best_responses_token_nll(tiny_model_dir, rankings):
    module = built(DPOModule(ModelSpec(str(tiny_model_dir)), beta=0.1, rpo_alpha=0.5))
    dm = data_module(module.tokenizer, rankings)
    batch = dm.collate(dm.train_dataset[:4])
    loss_sum, stats = module._loss_terms(batch)
    logps, lengths = module.response_logprobs(batch)
    best = batch["ranks"].argmin(-1)  # the fixture's rankings have no ties at the top
    rows = torch.arange(4)
    nll = (-logps[rows, best] / lengths[rows, best]).mean()
    assert nll > 0
    torch.testing.assert_close(loss_sum / 4, math.log(2) + 0.5 * nll, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats["nll_sum"] / 4, nll.detach(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rpo_alpha"):
        DPOModule(ModelSpec(str(tiny_model_dir)), rpo_alpha=-1.0)


def test_completion_logprobs_keep_only_the_response_logits_yet_equal_a_full_forward(tiny_model_dir, rankings):
    module = built(DPOModule(ModelSpec(str(tiny_model_dir))))
    batch = data_module(module.tokenizer, rankings, padding_side="left").collate(
        data_module(module.tokenizer, rankings).train_dataset[:3]
    )
    logps, lengths = completion_logprobs(module.policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
    for row in range(batch["input_ids"].shape[0]):
        labels = batch["labels"][row]
        if (labels == IGNORE_INDEX).all():
            continue
        real = batch["attention_mask"][row].bool()
        # the row alone, without padding: positions are the same, so the logits are too
        ids = batch["input_ids"][row][real].unsqueeze(0)
        with torch.no_grad():
            alone = module.policy(input_ids=ids).logits[0].log_softmax(-1)
        lab = labels[real]
        expected = sum(alone[t - 1, lab[t]] for t in range(1, len(lab)) if lab[t] != IGNORE_INDEX)
        torch.testing.assert_close(logps[row], expected, atol=1e-5, rtol=1e-6)
        assert lengths[row] == (lab != IGNORE_INDEX).sum()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_kwise_forward_equals_each_pair_given_pairwise(tiny_model_dir, tmp_path, loss_type):
    """One forward over a prompt's K responses gives the per-prompt mean of the losses of its pairs, each pair
    scored on its own in a pairwise batch (another padding width)."""
    beta = 2.0 if loss_type == "simpo" else 0.5
    module = built(DPOModule(ModelSpec(str(tiny_model_dir)), loss_type=loss_type, beta=beta))
    perturb(module.policy)  # policy != reference, so the log-ratios are not all 0
    tok = module.tokenizer
    dm = data_module(tok, write_jsonl(tmp_path / "rows.jsonl", ROWS))
    with torch.no_grad():
        loss_sum, stats = module._loss_terms(dm.collate(dm.train_dataset))
    expected = []
    for row in ROWS:
        responses = row.get("responses") or [row["chosen"], row["rejected"]]
        ranking = row.get("ranking", [0, 1])
        rank = {i: pos for pos, g in enumerate(ranking) for i in (g if isinstance(g, list) else [g])}
        pairs = [(w, lo) for w in rank for lo in rank if rank[w] < rank[lo]]
        losses = []
        for w, lo in pairs:
            pair_row = {"prompt": row["prompt"], "chosen": responses[w], "rejected": responses[lo]}
            pdm = data_module(tok, write_jsonl(tmp_path / "pair.jsonl", [pair_row]))
            with torch.no_grad():
                pair_loss, _ = module._loss_terms(pdm.collate(pdm.train_dataset))
            losses.append(pair_loss)
        expected.append(torch.stack(losses).mean())
    assert stats["pairs"] == 5 + 1 + 3
    torch.testing.assert_close(loss_sum, torch.stack(expected).sum(), atol=1e-5, rtol=1e-6)


# ---- training -----------------------------------------------------------------------------------------------
def train_once(model_dir, rankings, micro_batch_size, **kwargs) -> DPOModule:
    torch.manual_seed(0)
    module = DPOModule(
        ModelSpec(str(model_dir)),
        micro_batch_size=micro_batch_size,
        max_grad_norm=None,
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        **kwargs,
    )
    dm = PreferenceDataModule(str(rankings), batch_size=8, max_length=64)
    cpu_trainer(max_steps=2).fit(module, datamodule=dm)
    return module


def test_micro_batches_equal_one_batch_and_only_the_policy_moves(tiny_model_dir, rankings):
    whole = train_once(tiny_model_dir, rankings, None)
    split = train_once(tiny_model_dir, rankings, 3)
    initial = load_model(ModelSpec(str(tiny_model_dir)), whole.tokenizer, "causal_lm", trainable=False).state_dict()
    policy, reference = whole.policy.state_dict(), whole.reference.state_dict()
    assert any(not torch.equal(policy[k], initial[k]) for k in initial), "two SGD steps must change the policy"
    for key in initial:
        torch.testing.assert_close(reference[key], initial[key], atol=0, rtol=0)
        torch.testing.assert_close(split.policy.state_dict()[key], policy[key], atol=1e-5, rtol=0, msg=key)


def test_cached_reference_logprobs_equal_recomputed_ones(tiny_model_dir, rankings):
    module = train_once(tiny_model_dir, rankings, 4, precompute_ref_logprobs=True)
    assert module.ref_cache is not None and len(module.ref_cache) == 16 * 4
    assert module.ref_cache_misses == 0
    dm = data_module(module.tokenizer, rankings, padding_side="left")  # other padding, other grouping
    batch = dm.collate(dm.train_dataset[5:11])
    cached = module.reference_logprobs(batch)
    assert module.ref_cache_misses == 0
    recomputed = module.response_logprobs(batch, reference=True)[0]
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-6)  # float32 sums of ~-150 nats
    assert (cached[batch["response_mask"]] < 0).all()


def test_lora_reference_is_the_policy_with_its_adapter_disabled(tiny_model_dir, rankings, tmp_path):
    torch.manual_seed(0)
    module = DPOModule(ModelSpec(str(tiny_model_dir)), optimizer=lambda p: torch.optim.SGD(p, lr=5.0))
    dm = PreferenceDataModule(str(rankings), batch_size=8, max_length=64)
    export = tmp_path / "export"
    callbacks = [LoRAQuantization(lora=LoraSpec(r=4, alpha=8)), HFExport(str(export))]
    cpu_trainer(max_steps=2, callbacks=callbacks).fit(module, datamodule=dm)
    assert module.reference is None, "a LoRA policy needs no second copy"
    base = load_model(ModelSpec(str(tiny_model_dir)), module.tokenizer, "causal_lm", trainable=False)
    batch = data_module(module.tokenizer, rankings).collate(dm.train_dataset[:4])
    ref = module.response_logprobs(batch, reference=True)[0]
    real = batch["response_mask"].reshape(-1)
    rows = (batch["input_ids"][real], batch["attention_mask"][real], batch["labels"][real])
    with torch.no_grad():
        expected = completion_logprobs(base, *rows)[0]
        policy = module.response_logprobs(batch)[0].detach()
    torch.testing.assert_close(ref[batch["response_mask"]], expected, atol=1e-5, rtol=1e-6)
    assert (policy - ref).abs().max() > 1e-3, "the trained adapter must change the policy"
    # the merged export is the trained policy, loadable as a plain causal LM
    exported = load_model(ModelSpec(str(export)), load_tokenizer(ModelSpec(str(export))), "causal_lm", trainable=False)
    with torch.no_grad():
        torch.testing.assert_close(
            completion_logprobs(exported, *rows)[0], policy[batch["response_mask"]], atol=1e-4, rtol=0
        )


def test_simpo_loads_no_reference_and_bad_settings_are_refused(tiny_model_dir):
    module = built(DPOModule(ModelSpec(str(tiny_model_dir)), loss_type="simpo", beta=2.0))
    assert module.reference is None and "reference" not in module.model_specs()
    with pytest.raises(ValueError, match="reference-free"):
        DPOModule(ModelSpec(str(tiny_model_dir)), loss_type="simpo", precompute_ref_logprobs=True)
    with pytest.raises(ValueError, match="not to ipo"):
        DPOModule(ModelSpec(str(tiny_model_dir)), loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        DPOModule(ModelSpec(str(tiny_model_dir)), loss_type="hinge")


# ---- resume -------------------------------------------------------------------------------------------------
class Preempt(Callback):
    """Send this process a SIGTERM after ``step`` optimizer steps: Lightning stops at the batch boundary and
    PreemptionCheckpoint saves ``last.ckpt``, as when a scheduler pre-empts a run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            # Lightning's handler replaces the default one (which would end the test process) during fit
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGTERM)


class SkipsTheSecondBatch(DPOModule):
    """A NaN loss on the run's second batch: its optimizer step is skipped and counted in the epoch's
    ``train/skipped_steps``."""

    def _loss_terms(self, batch):
        loss_sum, stats = super()._loss_terms(batch)
        if self.training and self.trainer.fit_loop.epoch_loop.batch_progress.total.ready == 2:
            loss_sum = loss_sum * float("nan")
        return loss_sum, stats


def _resume_run(root, model_dir, rankings, preempt_at=None, ckpt_path=None) -> DPOModule:
    """Two epochs of 4 batches: a LoRA policy (reference = adapter disabled) with cached reference log-probs,
    the default warm-up/cosine schedule, every batch logged by lit_rlhf's CSV logger."""
    torch.manual_seed(0)  # the same LoRA initialisation in every run
    module = SkipsTheSecondBatch(
        ModelSpec(str(model_dir), lora=LoraSpec(r=4, alpha=8)),
        precompute_ref_logprobs=True,
        micro_batch_size=2,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    callbacks = [ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0), PreemptionCheckpoint()]
    trainer = cpu_trainer(
        max_epochs=2,
        default_root_dir=root,
        logger=CSVLogger(str(root), name="logs", version=0),
        log_every_n_steps=1,
        enable_checkpointing=True,
        callbacks=callbacks + ([Preempt(preempt_at)] if preempt_at else []),
    )
    data = PreferenceDataModule(str(rankings), batch_size=4, max_length=64)  # 4 steps an epoch
    if preempt_at is None:
        trainer.fit(module, data, ckpt_path=ckpt_path)
    else:
        with pytest.raises(SIGTERMException):
            trainer.fit(module, data)
    return module


def test_interrupted_run_resumes_exactly(tiny_model_dir, rankings, tmp_path):
    """Pre-empted after 3 of 8 batches (mid-epoch, one step skipped) and resumed: the same weights and metric
    rows as the uninterrupted run, epoch sums included; the resumed run rebuilds the reference cache from the
    base weights, not from the restored adapter."""
    whole = _resume_run(tmp_path / "a", tiny_model_dir, rankings)
    part = _resume_run(tmp_path / "b", tiny_model_dir, rankings, preempt_at=2)
    ckpt = tmp_path / "b" / "ckpt" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2 and part.ref_cache is not None
    resumed = _resume_run(tmp_path / "b", tiny_model_dir, rankings, ckpt_path=ckpt)
    assert resumed.trainer.global_step == whole.trainer.global_step == 7  # 8 batches, one skipped
    assert resumed.reference is None and resumed.ref_cache_misses == whole.ref_cache_misses == 0
    assert resumed.ref_cache.keys() == whole.ref_cache.keys() and len(whole.ref_cache) == 16 * 4
    assert all(resumed.ref_cache[k] == pytest.approx(v, abs=1e-6) for k, v in whole.ref_cache.items())
    lora_b = [p for n, p in whole.named_parameters() if "lora_B" in n]  # zero at the start
    assert lora_b and any(p.abs().max() > 1e-3 for p in lora_b), "the adapter trained"
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    full_log, resumed_log = (read_log(tmp_path / run / "logs" / "version_0" / "metrics.csv") for run in "ab")
    assert len(full_log) == 8 + 2 and "rewards/accuracies" in full_log[0]  # a row a batch, one an epoch
    assert [r["train/skipped_steps"] for r in full_log if "train/skipped_steps" in r] == [1.0, 0.0]
    assert_same_rows(resumed_log, full_log)
