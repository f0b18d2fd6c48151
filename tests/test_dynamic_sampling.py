"""DAPO's dynamic sampling (§3.2): batches are drawn until a step holds a full batch of groups with signal; the
step trains on exactly that many, each with signal; the buffer survives a checkpoint and a resumed run trains as
an uninterrupted one. Also ``Rollout.concat``, which gathers rows of several draws without changing them."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_rlhf.datamodules.prompts import PromptDataModule
from lit_rlhf.hf import ModelSpec
from lit_rlhf.models import CriticFreeModule
from lit_rlhf.models.critic_free import UpdateConfig
from lit_rlhf.models.ppo import RewardConfig, SamplingConfig
from lit_rlhf.rlhf import Rollout, logprobs_from_logits
from lit_rlhf.rlhf.algorithms import DAPO, GRPO
from tests.conftest import write_jsonl
from tests.helpers import cpu_trainer

FLAT = "hotel"  # prompts about a hotel always score 1: their groups never carry signal


def flat_or_length(prompts: list[str], responses: list[str]) -> list[float]:
    return [1.0 if FLAT in p else float(len(r)) for p, r in zip(prompts, responses, strict=True)]


@pytest.fixture()
def prompt_file(tmp_path):
    subjects = ["movie", FLAT, "book", FLAT, "phone", FLAT, "song", FLAT] * 3
    return write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"The {s} number {i} was"} for i, s in enumerate(subjects)]
    )


def build(model_dir, **algorithm) -> CriticFreeModule:
    return CriticFreeModule(
        policy=ModelSpec(str(model_dir)),
        # no overlong shaping: it would give the flat prompts' groups a signal (their lengths differ)
        algorithm=DAPO(group_size=2, overlong_coef=0.0, **algorithm),
        update=UpdateConfig(ppo_epochs=1, num_mini_batches=1),
        reward=RewardConfig(fn=flat_or_length),
        sampling=SamplingConfig(max_new_tokens=6),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0),
    )


def test_rollout_concat_pads_without_changing_any_row(tiny_model_dir):
    module = CriticFreeModule(policy=ModelSpec(str(tiny_model_dir)), reward=RewardConfig(fn=flat_or_length))
    module.configure_model()
    tok = module.tokenizer
    pad = tok.pad_token_id

    def rollout(prompts: list[str], length: int) -> Rollout:
        enc = tok(prompts, return_tensors="pt", padding=True)
        responses = torch.randint(5, 40, (len(prompts), length))
        mask = torch.ones_like(responses, dtype=torch.bool)
        mask[0, length - 1 :] = False
        responses[~mask] = pad
        qr = torch.cat([enc.input_ids, responses], 1)
        am = torch.cat([enc.attention_mask, mask.long()], 1)
        f = torch.rand(len(prompts), length) * mask
        return Rollout(qr, am, responses, mask, f, f + 1, f + 2, torch.rand(len(prompts)), f + 3, f + 4, f + 5)

    a = rollout(["a", "the movie was very"], 3)
    b = rollout(["I thought that the book was"], 5)
    merged = Rollout.concat([a, b], pad)
    assert merged.query_responses.shape == (3, b.context_length + 5) and merged.responses.shape == (3, 5)
    assert torch.equal(merged.query_responses[2], b.query_responses[0])
    assert torch.equal(merged.query_responses[:2, -5:-2], a.responses) and (merged.responses[:2, 3:] == pad).all()
    assert not merged.mask[:2, 3:].any() and torch.equal(merged.scores, torch.cat([a.scores, b.scores]))
    assert (merged.attention_mask[:2, : b.context_length - a.context_length] == 0).all()
    for name in ("logprobs", "advantages", "returns"):
        assert (
            torch.equal(getattr(merged, name)[:2, :3], getattr(a, name)) and (getattr(merged, name)[:2, 3:] == 0).all()
        )
    # the policy reads each row as before: positions come from the mask, padding is masked out of attention
    with torch.no_grad():
        lp_a = logprobs_from_logits(module.policy_forward(a.query_responses, a.attention_mask, 3)[0], a.responses)
        lp_m = logprobs_from_logits(
            module.policy_forward(merged.query_responses, merged.attention_mask, 5)[0], merged.responses
        )
    torch.testing.assert_close(lp_m[:2, :3][a.mask], lp_a[a.mask], atol=1e-5, rtol=0)


def test_each_update_holds_a_full_batch_of_groups_with_signal(tiny_model_dir, prompt_file):
    L.seed_everything(0)
    module = build(tiny_model_dir)
    learned = []
    learn = module.learn
    module.learn = lambda rollout, stats, rows: (
        learned.append((rollout, rows, dict(stats))) or learn(rollout, stats, rows)
    )
    trainer = cpu_trainer(max_steps=3)
    trainer.fit(module, PromptDataModule(str(prompt_file), batch_size=4))
    assert trainer.global_step == 3 and len(learned) == 3
    draws = [int(stats["train/draws"]) for _, _, stats in learned]
    assert module.iteration == sum(draws) > 3  # about half of each batch has no signal: more batches were drawn
    for rollout, rows, stats in learned:
        assert len(rollout.responses) == 4 * 2  # exactly the batch's 4 groups of K = 2
        assert not any(FLAT in p for p in rows.prompts)  # only groups with signal
        assert rows.prompts[0::2] == rows.prompts[1::2]  # a group's rows stay adjacent
        assert (rollout.scores.view(4, 2).diff(dim=1) != 0).all()
        assert rollout.mask.any(1).all()
        assert float(stats["train/zero_signal_groups"]) > 0


def test_without_dynamic_sampling_each_batch_trains_on_what_it_keeps(tiny_model_dir, prompt_file):
    module = build(tiny_model_dir, dynamic_sampling=False)
    trainer = cpu_trainer(max_steps=2)
    trainer.fit(module, PromptDataModule(str(prompt_file), batch_size=4))
    assert module.iteration == 2  # one batch per update


def test_the_buffer_survives_a_checkpoint_and_a_resume_is_exact(tmp_path, tiny_model_dir, prompt_file):
    def run(root, steps, ckpt_path=None) -> CriticFreeModule:
        L.seed_everything(0)
        module = build(tiny_model_dir)
        saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)
        trainer = cpu_trainer(max_steps=steps, default_root_dir=root, callbacks=[saver], enable_checkpointing=True)
        trainer.fit(module, PromptDataModule(str(prompt_file), batch_size=4), ckpt_path=ckpt_path)
        return module

    whole = run(tmp_path / "a", 3)
    run(tmp_path / "b", 1)
    resumed = run(tmp_path / "b", 3, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt")
    assert resumed.iteration == whole.iteration
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name

    # a checkpoint taken between two draws (a preemption) holds the buffered groups, weights-only loadable
    module = build(tiny_model_dir)
    module.configure_model()
    dm = PromptDataModule(str(prompt_file), batch_size=4)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    out = module.dynamic_sampling_step(module.grouped(dm.collate([dm.train_dataset[i] for i in range(4)])))
    assert module.signal_buffer.draws == 1 and len(module.signal_buffer.parts) == 1 and "kl" in out
    checkpoint = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "mid.ckpt")
    loaded = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    other = build(tiny_model_dir)
    other.on_load_checkpoint(loaded)
    assert other.signal_buffer.draws == 1
    (r1, rows1), (r2, rows2) = module.signal_buffer.parts[0], other.signal_buffer.parts[0]
    assert rows1 == rows2 and all(torch.equal(x, y) for x, y in zip(r1, r2, strict=True))


def test_dynamic_sampling_needs_the_zero_signal_filter():
    with pytest.raises(ValueError, match="dynamic_sampling refills the groups"):
        GRPO(dynamic_sampling=True)
    assert DAPO().dynamic_sampling and GRPO(drop_zero_signal_groups=True, dynamic_sampling=True).max_draws == 8
