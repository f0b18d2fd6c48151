"""PPOModule on tiny offline models: rollout invariants, the LoRA reference, learning, frozen roles, CLI."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lit_rlhf.cli import main
from lit_rlhf.datamodules.prompts import PromptDataModule
from lit_rlhf.datamodules.ptx import ptx_batch
from lit_rlhf.hf import LoraSpec, ModelSpec, load_model
from lit_rlhf.hf.forwards import response_logits
from lit_rlhf.hf.generation import generation_config
from lit_rlhf.imports import import_callable
from lit_rlhf.models.ppo import KLConfig, PPOConfig, PPOModule, PTXConfig, RewardConfig, SamplingConfig
from lit_rlhf.quickstart.task import prompt_examples, sft_examples
from lit_rlhf.rlhf import (
    RunningMoments,
    logprobs_from_logits,
    masked_whiten,
    response_masks,
    sft_nll,
    truncate_after_eos,
)
from tests.conftest import write_jsonl
from tests.helpers import cpu_trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prompts_jsonl(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prompts")
    return (
        write_jsonl(root / "train.jsonl", prompt_examples(64, seed=1, split="train")),
        write_jsonl(root / "eval.jsonl", prompt_examples(8, seed=2, split="eval")),
    )


def prompt_batch(module: PPOModule, path: Path, size: int = 8) -> dict:
    dm = PromptDataModule(str(path), batch_size=size)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    return dm.collate([dm.train_dataset[i] for i in range(size)])


def build(policy_dir, classifier_dir=None, **kwargs) -> PPOModule:
    if classifier_dir is not None:
        kwargs.setdefault("critic", ModelSpec(str(classifier_dir)))
        kwargs.setdefault("reward_model", ModelSpec(str(classifier_dir)))
    module = PPOModule(policy=kwargs.pop("policy", ModelSpec(str(policy_dir))), **kwargs)
    module.configure_model()
    return module


def test_first_minibatch_ratio_is_one(tiny_model_dir, tiny_classifier_dir, prompts_jsonl):
    temperature = 0.7
    module = build(tiny_model_dir, tiny_classifier_dir, sampling=SamplingConfig(max_new_tokens=10, temperature=0.7))
    rollout, _ = module.collect_rollout(prompt_batch(module, prompts_jsonl[0]))
    micro = rollout.select([5, 1, 3]).trim()  # another grouping and padding width than in the rollout
    length = micro.responses.shape[1]
    logits, _ = module.policy_forward(micro.query_responses, micro.attention_mask, length)
    new = logprobs_from_logits(logits, micro.responses, temperature)
    ratio = torch.exp(torch.where(micro.mask, new - micro.logprobs, 0))
    assert (ratio - 1).abs().max() < 1e-5
    # the same check fails when the temperature is forgotten at training time (docs/conventions.md#temperature)
    unscaled = logprobs_from_logits(logits, micro.responses, 1.0)
    assert (torch.where(micro.mask, unscaled - micro.logprobs, 0)).abs().max() > 1e-2


def test_generation_logprobs_equal_a_full_forward(tiny_model_dir, prompts_jsonl):
    temperature = 0.7
    module = build(tiny_model_dir, value_head=True, reward=RewardConfig(fn=lambda p, r: [0.0] * len(r)))
    batch = prompt_batch(module, prompts_jsonl[0])
    tok = module.tokenizer
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    torch.manual_seed(0)
    out = module.policy.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
        generation_config=generation_config(SamplingConfig(12, temperature), tok.eos_token_id, tok.pad_token_id),
    )
    responses = out.sequences[:, prompt_ids.shape[1] :]
    _, mask, _ = response_masks(responses, tok.pad_token_id, tok.eos_token_id)
    raw = logprobs_from_logits(torch.stack(out.logits, 1), responses, temperature)  # raw logits / T
    processed = torch.log_softmax(torch.stack(out.scores, 1), -1).gather(-1, responses[..., None])[..., 0]
    qr, am = torch.cat([prompt_ids, responses], 1), torch.cat([prompt_mask, mask.long()], 1)
    logits, _ = module.policy_forward(qr, am, responses.shape[1])
    recomputed = logprobs_from_logits(logits, responses, temperature)
    assert mask.sum() > 20
    assert (torch.where(mask, recomputed - raw, 0)).abs().max() < 1e-5
    # generate's processed scores hold only the temperature
    assert (torch.where(mask, recomputed - processed, 0)).abs().max() < 1e-5


def test_kl_and_logprobs_zero_after_eos_and_score_added_once(tiny_model_dir, prompts_jsonl, monkeypatch):
    module = build(
        tiny_model_dir,
        value_head=True,
        kl=KLConfig(coef=0.1),
        reward=RewardConfig(fn=lambda p, r: [2.0, -1.0, 0.5, 3.0][: len(r)], missing_eos_penalty=0.25),
    )
    tok = module.tokenizer
    eos, pad, word = tok.eos_token_id, tok.pad_token_id, tok(" great")["input_ids"][0]
    fixed = torch.tensor(
        [[word, eos, word, word, eos], [word] * 5, [eos, word, eos, word, word], [word, word, word, eos, word]]
    )

    def fake_sample(policy, prompt_ids, prompt_mask, sampling, seed, eos_token_id, pad_token_id, synced_gpus):
        return truncate_after_eos(fixed, eos_token_id, pad_token_id)

    monkeypatch.setattr("lit_rlhf.hf.engines.sample_responses", fake_sample)  # under HFEngine
    rollout, stats = module.collect_rollout(prompt_batch(module, prompts_jsonl[0], size=4))
    eos_index = torch.tensor([1, 4, 0, 3])  # no EOS in row 1: the last token takes the score
    expected_mask = torch.arange(5) <= eos_index[:, None]
    assert torch.equal(rollout.mask, expected_mask)
    assert (rollout.responses[~expected_mask] == pad).all()
    for name in ("logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
        assert (getattr(rollout, name)[~expected_mask] == 0).all(), name
    assert (rollout.logprobs[expected_mask] < 0).all()
    assert torch.allclose(rollout.scores, torch.tensor([2.0, -1.25, 0.5, 3.0]))  # penalty on row 1 only
    kl = rollout.logprobs - rollout.ref_logprobs  # k1
    score_part = rollout.rewards + 0.1 * kl  # what is left after the KL penalty: the score, once, at the EOS
    expected = torch.zeros(4, 5)
    expected[torch.arange(4), eos_index] = rollout.scores
    assert torch.allclose(score_part, expected, atol=1e-6)
    assert stats["rollout/eos_rate"] == 0.75


def test_lora_reference_is_the_disabled_adapter_without_a_copy(tiny_model_dir, tiny_classifier_dir, prompts_jsonl):
    lora = ModelSpec(str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8))
    module = build(tiny_model_dir, tiny_classifier_dir, policy=lora)
    assert module.reference is None
    with torch.no_grad():  # make the adapter matter (lora_B starts at 0)
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    sft = load_model(ModelSpec(str(tiny_model_dir)), module.tokenizer, "causal_lm", trainable=False)
    batch = prompt_batch(module, prompts_jsonl[0])
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    ref_logits, _ = module.policy_forward(ids, mask, 3, reference=True)
    sft_logits, _ = response_logits(sft, ids, mask, 3)
    policy_logits, _ = module.policy_forward(ids, mask, 3)
    assert torch.equal(ref_logits, sft_logits)
    assert (policy_logits - sft_logits).abs().max() > 1e-3
    # no second copy of the base weights: every parameter is stored once, and the module holds exactly
    # one policy base + adapters + critic + reward model
    params = list(module.parameters())
    assert len({p.data_ptr() for p in params}) == len(params)
    n_base = sum(p.numel() for p in sft.parameters())
    n_lora = sum(p.numel() for n, p in module.policy.named_parameters() if "lora_" in n)
    n_classifiers = sum(p.numel() for p in module.critic.parameters()) * 2
    assert sum(p.numel() for p in params) == n_base + n_lora + n_classifiers


def _trainer(tmp_path: Path, steps: int, **kwargs) -> L.Trainer:
    return cpu_trainer(max_steps=steps, default_root_dir=tmp_path, **kwargs)


def test_reward_fn_run_raises_the_score(tmp_path, tiny_model_dir, prompts_jsonl):
    """A random tiny policy learns to write more letters "e" when each one earns a point."""

    def count_e(prompts, responses):
        return [float(r.count("e")) for r in responses]

    L.seed_everything(0)
    module = PPOModule(
        policy=ModelSpec(str(tiny_model_dir)),
        value_head=True,
        reward=RewardConfig(fn=count_e),
        sampling=SamplingConfig(max_new_tokens=6),
        ppo=PPOConfig(ppo_epochs=4, vf_coef=0.5),
        kl=KLConfig(coef=0.01),
        optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3),
    )
    data = PromptDataModule(str(prompts_jsonl[0]), batch_size=32)
    scores = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            scores.append(float(outputs["score"]))

    _trainer(tmp_path, steps=4 * 20, callbacks=[Record()]).fit(module, data)  # 20 iterations, 80 updates
    assert len(scores) == 20
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert first < 0.6 and last > 2.0 + first, scores  # measured: 0.40 -> 3.81


def test_trainable_weights_change_frozen_ones_stay(tmp_path, tiny_model_dir, tiny_classifier_dir, prompts_jsonl):
    module = build(
        tiny_model_dir, tiny_classifier_dir, ppo=PPOConfig(ppo_epochs=1, num_mini_batches=2, micro_batch_size=2)
    )
    frozen = {n: p.clone() for n, p in module.named_parameters() if n.startswith(("reference.", "reward_model."))}
    trained = {n: p.clone() for n, p in module.named_parameters() if n.startswith(("policy.", "critic."))}
    assert frozen and trained and all(p.requires_grad for n, p in module.named_parameters() if n in trained)
    trainer = _trainer(tmp_path, steps=2)
    trainer.fit(module, PromptDataModule(str(prompts_jsonl[0]), batch_size=8))
    params = dict(module.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    changed = [n for n, p in trained.items() if not torch.equal(params[n], p)]
    assert any(n.startswith("policy.") for n in changed) and any(n.startswith("critic.") for n in changed)
    # the checkpoint holds the trained weights and the PPO state, not the frozen roles
    trainer.save_checkpoint(tmp_path / "ppo.ckpt")
    ckpt = torch.load(tmp_path / "ppo.ckpt", weights_only=False)
    assert not any(k.startswith(("reference.", "reward_model.")) for k in ckpt["state_dict"])
    assert set(trained) <= set(ckpt["state_dict"])
    assert ckpt["ppo_state"] == {"kl_controller": {"value": 0.05}, "iteration": 1}


def test_needs_one_score_source_and_one_value_function(tiny_model_dir):
    spec = ModelSpec(str(tiny_model_dir))
    with pytest.raises(ValueError, match="exactly one score source"):
        PPOModule(policy=spec, value_head=True)
    with pytest.raises(ValueError, match="exactly one score source"):
        PPOModule(policy=spec, value_head=True, reward_model=spec, reward=RewardConfig(fn="a.b:c"))
    with pytest.raises(ValueError, match="exactly one value function"):
        PPOModule(policy=spec, reward_model=spec)
    with pytest.raises(ValueError, match="must look like 'package.module:function'"):
        import_callable("vader_reward")
    assert import_callable("lit_rlhf.quickstart.rewards:vader_reward")([""], [" great."])[0] > 0.5


def test_quickstart_config_runs_end_to_end(tmp_path, tiny_model_dir, tiny_classifier_dir, prompts_jsonl):
    root = tmp_path / "qs"
    shutil.copytree(tiny_model_dir, root / "sft" / "export")
    shutil.copytree(tiny_classifier_dir, root / "rm" / "export")
    shutil.copy(prompts_jsonl[0], write_jsonl(root / "data" / "prompts" / "train.jsonl", []))
    shutil.copy(prompts_jsonl[1], root / "data" / "prompts" / "eval.jsonl")
    write_jsonl(root / "data" / "sft" / "train.jsonl", sft_examples(32, seed=1))  # the shipped config's PTX data
    config = (REPO / "configs" / "quickstart" / "ppo.yaml").read_text().replace("runs/quickstart", str(root))
    (tmp_path / "ppo.yaml").write_text(config)
    main(
        [
            "fit",
            "--config",
            str(tmp_path / "ppo.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.sampling.max_new_tokens=6",
            "--data.init_args.batch_size=8",
        ]
    )
    assert (root / "ppo" / "checkpoints" / "last.ckpt").is_file()
    export = root / "ppo" / "export"
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    metrics = (root / "ppo" / "logs" / "metrics.csv").read_text()
    for key in ("objective/kl", "objective/score", "policy/ratio", "value/explained_variance", "val/score", "ptx/loss"):
        assert key in metrics


def test_example_qlora_config_parses():
    config = str(REPO / "configs" / "examples" / "ppo-qlora.yaml")
    cli = main(["--config", config, "--trainer.accelerator=cpu"], run=False)  # the config names a GPU
    module = cli.model
    assert isinstance(module, PPOModule) and not module.models_built
    assert cli.trainer.precision == "bf16-mixed"


def _resume_run(tmp_path, model_dir, prompts, steps: int, ckpt_path=None, record=None) -> PPOModule:
    module = PPOModule(
        policy=ModelSpec(str(model_dir)),
        value_head=True,
        reward=RewardConfig(fn=lambda p, r: [float(x.count("e")) for x in r], normalize=True, clip=3.0),
        sampling=SamplingConfig(max_new_tokens=5),
        ppo=PPOConfig(ppo_epochs=1, num_mini_batches=2),
        kl=KLConfig(coef=0.2, target=0.01, horizon=100),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        # a constant LR: a cosine schedule's length would differ between the short and the long run
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0),
    )
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = _trainer(tmp_path, steps=steps, callbacks=[record, saver], enable_checkpointing=True)
    trainer.fit(module, PromptDataModule(str(prompts), batch_size=8), ckpt_path=ckpt_path)
    return module


def test_interrupted_run_resumes_exactly(tmp_path, tiny_model_dir):
    """KL controller, score statistics, optimizer, RNG and data position all continue where they stopped."""
    prompts = write_jsonl(tmp_path / "p.jsonl", prompt_examples(24, seed=5))  # 3 iterations per epoch

    class Record(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append((batch["prompts"], round(float(outputs["kl"]), 5), round(float(outputs["score"]), 5)))

    full = Record()
    whole = _resume_run(tmp_path / "a", tiny_model_dir, prompts, steps=2 * 5, record=full)
    first, second = Record(), Record()
    _resume_run(tmp_path / "b", tiny_model_dir, prompts, steps=2 * 2, record=first)
    resumed = _resume_run(
        tmp_path / "b",
        tiny_model_dir,
        prompts,
        steps=2 * 5,
        ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt",
        record=second,
    )
    assert len(full.seen) == 5 and first.seen == full.seen[:2]
    assert [s[0] for s in second.seen] == [s[0] for s in full.seen[2:]]  # same prompts, across the epoch end
    assert second.seen == full.seen[2:]
    assert resumed.iteration == whole.iteration == 5
    assert resumed.kl_ctl.value == whole.kl_ctl.value != 0.2
    assert torch.equal(resumed.score_moments.mean, whole.score_moments.mean)
    assert int(resumed.score_moments.count) == 5 * 8
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


class FakeAllReduce:
    """``world`` threads play processes; ``reduce_fn(rank)`` sums a tensor over all of them (like all_reduce)."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world

    def reduce_fn(self, rank: int):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before everyone has summed
            return total

        return reduce


def run_ranks(world: int, fn) -> list:
    results: list = [None] * world
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, fn(r))) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_advantage_statistics_equal_with_one_and_two_processes():
    """Whitening over the global batch: 2 processes with 3 + 5 responses (of different lengths) give the
    advantages that 1 process gets on all 8; so do the running score statistics."""
    gen = torch.Generator().manual_seed(0)
    advantages = torch.randn(8, 7, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([2, 6, 5, 1, 6, 3, 7, 4])
    mask = torch.arange(7) < lengths[:, None]
    scores = torch.randn(8, generator=gen, dtype=torch.float64)
    single = masked_whiten(advantages, mask).masked_fill(~mask, 0)
    moments = RunningMoments()
    moments.update(scores, lambda t: t)
    parts, fake = [slice(0, 3), slice(3, 8)], FakeAllReduce(2)
    width = [6, 7]  # each process pads to its own longest response

    def rank(r: int):
        a, m = advantages[parts[r], : width[r]], mask[parts[r], : width[r]]
        rank_moments = RunningMoments()
        rank_moments.update(scores[parts[r]], fake.reduce_fn(r))
        return masked_whiten(a, m, reduce_fn=fake.reduce_fn(r)).masked_fill(~m, 0), rank_moments

    (a0, m0), (a1, m1) = run_ranks(2, rank)
    assert torch.allclose(torch.cat([nn.functional.pad(a0, (0, 1)), a1]), single, atol=1e-12)
    for m in (m0, m1):
        assert torch.allclose(m.mean, moments.mean) and torch.allclose(m.var, moments.var) and m.count == 8
    # per-process statistics (TRL's behaviour) would differ
    local = masked_whiten(advantages[:3, :6], mask[:3, :6]).masked_fill(~mask[:3, :6], 0)
    assert (local - single[:3, :6]).abs().max() > 1e-2


def test_ppo_ptx_adds_the_scaled_lm_loss_and_learns_the_text(tmp_path, tiny_model_dir, sft_jsonl):
    def ptx_nll(module: PPOModule) -> float:
        batch = ptx_batch(module._ptx_examples, 32, module.tokenizer.pad_token_id, seed=123)
        with torch.no_grad():
            logits = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll_sum, tokens = sft_nll(logits, batch["labels"])
        return float(nll_sum / tokens), batch

    L.seed_everything(0)
    module = PPOModule(
        policy=ModelSpec(str(tiny_model_dir)),
        value_head=True,
        reward=RewardConfig(fn=lambda p, r: [0.0] * len(r)),
        sampling=SamplingConfig(max_new_tokens=4),
        ppo=PPOConfig(ppo_epochs=2),
        ptx=PTXConfig(data=str(sft_jsonl[0]), coef=2.0, batch_size=16),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    module.configure_model()
    before, batch = ptx_nll(module)
    loss, stats = module._ptx_loss(batch)  # γ · token-mean NLL (test vector T13 checks sign and scale only)
    assert torch.allclose(loss, 2.0 * stats["ptx/loss"]) and abs(float(stats["ptx/loss"]) - before) < 1e-5
    _trainer(tmp_path, steps=2 * 8).fit(module, PromptDataModule(str(sft_jsonl[0]), batch_size=8))
    after, _ = ptx_nll(module)
    assert after < before - 1.0, (before, after)  # measured: 5.8 -> 3.7


def test_qlora_policy_and_critic_with_a_4bit_reward_model(tmp_path, tiny_model_dir, tiny_classifier_dir, prompts_jsonl):
    """The 24 GB recipe in small: LoRA on 4-bit bases for policy and critic, a 4-bit frozen RM, critic LR."""
    import bitsandbytes as bnb

    from lit_rlhf.callbacks import LoRAQuantization
    from lit_rlhf.hf import QuantizationSpec

    module = PPOModule(
        policy=ModelSpec(str(tiny_model_dir)),
        critic=ModelSpec(str(tiny_classifier_dir)),
        reward_model=ModelSpec(str(tiny_classifier_dir)),
        sampling=SamplingConfig(max_new_tokens=4),
        ppo=PPOConfig(ppo_epochs=1, critic_lr=1e-4),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0),
    )
    four_bit = QuantizationSpec(bits=4, compute_dtype="float32")
    callbacks = [
        LoRAQuantization(lora=LoraSpec(r=4), quantization=four_bit, roles=["policy", "critic"]),
        LoRAQuantization(quantization=four_bit, roles=["reward_model"]),
    ]
    trainer = _trainer(tmp_path, steps=1, callbacks=callbacks)
    trainer.fit(module, PromptDataModule(str(prompts_jsonl[0]), batch_size=4))
    assert module.reference is None  # the disabled adapter
    for model in (module.policy, module.critic, module.reward_model):
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    groups = trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in module.critic.parameters() if p.requires_grad}
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    saved = torch.load(tmp_path / "q.ckpt", weights_only=True)["state_dict"]
    assert {k.split(".")[0] for k in saved} == {"policy", "critic", "score_moments", "skipped_steps"}
    assert all("lora_" in k or ".score." in k for k in saved if k.startswith(("policy.", "critic.")))


def test_a_sampled_pad_token_does_not_end_the_response():
    pad, eos, w = 0, 2, 7
    responses = torch.tensor([[w, pad, w, eos, pad], [w, w, w, w, w], [eos, pad, pad, pad, pad]])
    lengths, mask, contains_eos = response_masks(responses, pad, eos)
    assert lengths.tolist() == [3, 4, 0] and contains_eos.tolist() == [True, False, True]
    assert mask.sum(1).tolist() == [4, 5, 1]  # the pad the policy sampled at index 1 is an action


def test_a_nan_reward_skips_the_iteration_and_repeated_faults_stop(tmp_path, tiny_model_dir, prompts_jsonl):
    calls = []

    def sometimes_nan(prompts, responses):
        calls.append(1)
        bad = len(calls) == 2 or len(calls) >= 4  # iteration 2, then every iteration from the 4th
        return [float("nan") if bad else 1.0] * len(responses)

    module = PPOModule(
        policy=ModelSpec(str(tiny_model_dir)),
        value_head=True,
        reward=RewardConfig(fn=sometimes_nan),
        sampling=SamplingConfig(max_new_tokens=4),
        ppo=PPOConfig(ppo_epochs=1, num_mini_batches=1),
    )
    before = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            before[batch_idx] = [p.detach().clone() for p in pl_module.policy.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            same = all(torch.equal(a, b) for a, b in zip(before[batch_idx], pl_module.policy.parameters()))
            assert same == (batch_idx == 1 or batch_idx >= 3), batch_idx  # untouched exactly when skipped

    ckpt_dir = tmp_path / "ck"
    with pytest.warns(UserWarning, match="because the reward was NaN/inf"):
        _trainer(
            tmp_path,
            steps=50,
            enable_checkpointing=True,
            callbacks=[Snapshot(), L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir)],
        ).fit(module, PromptDataModule(str(prompts_jsonl[0]), batch_size=8))
    assert module.faults_total == 4 and module.last_fault == "reward"
    assert len(calls) == 6  # stopped after the 3rd consecutive fault (iterations 4, 5, 6)
    assert (ckpt_dir / "last.ckpt").exists()


def test_running_score_normalization_whitens_ppo_scores_with_checkpointed_statistics(
    tmp_path, tiny_model_dir, prompts_jsonl
):
    seen = []

    def length_reward(prompts, responses):
        scores = [10.0 + len(r) for r in responses]
        seen.extend(scores)
        return scores

    module = PPOModule(
        policy=ModelSpec(str(tiny_model_dir)),
        value_head=True,
        reward=RewardConfig(fn=length_reward, normalize=True, clip=5.0),
        sampling=SamplingConfig(max_new_tokens=6),
        ppo=PPOConfig(ppo_epochs=1, num_mini_batches=1),
    )
    trainer = _trainer(tmp_path, steps=3)
    trainer.fit(module, PromptDataModule(str(prompts_jsonl[0]), batch_size=8))
    raw = torch.tensor(seen, dtype=torch.float64)
    assert module.score_moments.count == len(seen) == 24
    assert float(module.score_moments.mean) == pytest.approx(float(raw.mean()), rel=1e-9)
    assert float(module.score_moments.var) == pytest.approx(float(raw.var(unbiased=False)), rel=1e-9)
    trainer.save_checkpoint(tmp_path / "n.ckpt")
    state = torch.load(tmp_path / "n.ckpt", weights_only=True)["state_dict"]
    assert float(state["score_moments.mean"]) == pytest.approx(float(raw.mean()), rel=1e-9)


def test_reward_normalization_callback_does_not_rewrite_a_ppo_config(tmp_path, tiny_model_dir, prompts_jsonl):
    from lit_rlhf.callbacks import RewardNormalization

    module = build(tiny_model_dir, value_head=True, reward=RewardConfig(fn=lambda p, r: [0.0] * len(r)))
    trainer = _trainer(tmp_path, steps=1, callbacks=[RewardNormalization()])
    with pytest.raises(ValueError, match="reward.normalize: true"):
        trainer.fit(module, PromptDataModule(str(prompts_jsonl[0]), batch_size=8))
    assert module.reward.normalize is False
