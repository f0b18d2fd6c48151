"""GRPO: seconds per iteration (generation, scoring, optimisation) and peak memory of ``CriticFreeModule`` under
the Trainer, beside a plain-PyTorch loop doing the same passes (``grpo`` case).

Setup: trainable policy, frozen reference copy, frozen reward model, no critic. One iteration = ``prompts / K``
prompts (16 on ``cpu``), each repeated K = 4 times and sampled in one ``generate`` call (64 responses, as the
PPO case), group advantages ``(r − mean) / (std + 1e-4)``, then ``ppo_epochs × minibatches`` optimizer steps of
the clipped surrogate (ε_low 0.2, ε_high 0.28) plus the β·k3 KL loss term, token mean. Phases are timed from
outside, as in ``benchmarks/ppo.py``.
"""

from __future__ import annotations

import contextlib
import math

import torch

from benchmarks.common import PRESETS, PeakMemory, Timer, base_model_dir, bench_trainer, data_dir, device
from benchmarks.ppo import ITERATIONS, Phases, _forward, _head_scores, preload, result, return_freed_memory, rm_dir
from lit_rlhf import ModelSpec
from lit_rlhf.datamodules import PromptDataModule
from lit_rlhf.hf.loading import load_model, load_tokenizer
from lit_rlhf.models import CriticFreeConfig, CriticFreeModule
from lit_rlhf.models.ppo import KLConfig, SamplingConfig
from lit_rlhf.rlhf import (
    clipped_policy_loss,
    entropy_from_logits,
    first_true_indices,
    group_advantages,
    kl_penalty,
    logprobs_from_logits,
    truncate_after_eos,
)

LR, KL_COEF, CLIP_LOW, CLIP_HIGH, EPS = 1e-5, 0.05, 0.2, 0.28, 1e-4


def prompt_data(preset: str) -> PromptDataModule:
    p = PRESETS[preset]
    return PromptDataModule(str(data_dir() / "prompts" / "train.jsonl"), batch_size=p["prompts"] // p["k"])


def prompt_batches(preset: str, tokenizer) -> list[dict]:
    dm = prompt_data(preset)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    return [next(loader) for _ in range(ITERATIONS[preset] + 1)]


def run_module(preset: str) -> dict[str, float]:
    p = PRESETS[preset]
    base, rm = str(base_model_dir(preset)), str(rm_dir(preset))
    preload()
    return_freed_memory()
    phases = Phases()
    with PeakMemory() as memory:
        module = CriticFreeModule(
            policy=ModelSpec(base),
            reward_model=ModelSpec(rm),
            algorithm=CriticFreeConfig(
                "grpo",
                group_size=p["k"],
                kl_in="loss",
                clip_low=CLIP_LOW,
                clip_high=CLIP_HIGH,
                std_eps=EPS,
                ppo_epochs=p["ppo_epochs"],
                num_mini_batches=p["minibatches"],
            ),
            sampling=SamplingConfig(max_new_tokens=p["new_tokens"]),
            kl=KLConfig(coef=KL_COEF),
            optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
        )
        phases.instrument(module)
        bench_trainer([phases], max_epochs=1, limit_train_batches=ITERATIONS[preset] + 1).fit(
            module, datamodule=prompt_data(preset)
        )
    assert phases.iterations == ITERATIONS[preset]
    return result(phases.seconds, phases.iterations, phases.iteration.seconds, memory)


def run_floor(preset: str) -> dict[str, float]:
    p = PRESETS[preset]
    k = p["k"]
    base, rm = str(base_model_dir(preset)), str(rm_dir(preset))
    tok = load_tokenizer(base)
    batches = prompt_batches(preset, tok)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    generate_kwargs = dict(
        max_new_tokens=p["new_tokens"],
        do_sample=True,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        num_beams=1,
        temperature=1.0,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
    )
    dev = device()
    preload()
    return_freed_memory()
    phases, iteration = {}, Timer()

    @contextlib.contextmanager
    def section(name: str, timed: bool):
        timer = Timer()
        with timer:
            yield
        if timed:
            phases[name] = phases.get(name, 0.0) + timer.seconds

    with PeakMemory() as memory:
        policy = load_model(ModelSpec(base), tok, "causal_lm", trainable=True).to(dev)
        reference = load_model(ModelSpec(base), tok, "causal_lm", trainable=False).to(dev)
        reward_model = load_model(ModelSpec(rm), tok, "sequence_classifier", trainable=False).to(dev)
        params = [q for q in policy.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR)

        def logits_of(model, ids, mask, length):
            return _forward(model, ids, mask, logits_to_keep=length + 1).logits[:, :-1]

        for it, batch in enumerate(batches):
            timed = it >= 1
            if timed:
                iteration.__enter__()
            prompt_ids = batch["prompt_input_ids"].to(dev).repeat_interleave(k, 0)
            prompt_mask = batch["prompt_attention_mask"].to(dev).repeat_interleave(k, 0)
            with section("generation", timed), torch.no_grad():
                policy.eval()
                with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                    torch.manual_seed(it * 7919)  # CriticFreeModule's seed for iteration `it`
                    out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **generate_kwargs)
                policy.train()
                responses = truncate_after_eos(out[:, prompt_ids.shape[1] :], eos, pad)

            with torch.no_grad():
                T = responses.shape[1]
                last = first_true_indices(responses == eos).clamp(max=T - 1)
                mask = torch.arange(T, device=dev) <= last[:, None]
                qr, am = torch.cat([prompt_ids, responses], 1), torch.cat([prompt_mask, mask.long()], 1)
                context = prompt_ids.shape[1]
                lead = min(int(first_true_indices(prompt_mask.bool().any(0)[None])[0]), context - 1)
                length = int(mask.sum(-1).max())
                qr, am, m = qr[:, lead : context + length], am[:, lead : context + length], mask[:, :length]
                tokens = qr[:, -length:]
                with section("scoring", timed):
                    with section("scoring_policy", timed):
                        logits = logits_of(policy, qr, am, length)
                        logprobs = logprobs_from_logits(logits, tokens)
                        entropy = entropy_from_logits(logits)  # noqa: F841  (the module logs it)
                    with section("scoring_reference", timed):
                        ref_logprobs = logprobs_from_logits(logits_of(reference, qr, am, length), tokens)
                    with section("scoring_reward", timed):
                        last_real = (torch.arange(am.shape[1], device=dev) * am).argmax(-1)
                        scores = _head_scores(reward_model, qr, am).gather(1, last_real[:, None]).squeeze(1)
                logprobs, ref_logprobs = (torch.where(m, t.float(), 0) for t in (logprobs, ref_logprobs))
                kl = kl_penalty(logprobs, ref_logprobs).masked_fill(~m, 0)  # noqa: F841  (logged by the module)
                advantages = torch.where(m, group_advantages(scores, k, eps=EPS)[:, None], 0)

            with section("optimisation", timed):
                size, mini = len(qr), math.ceil(len(qr) / p["minibatches"])
                generator = torch.Generator().manual_seed(it)
                for _ in range(p["ppo_epochs"]):
                    order = torch.randperm(size, generator=generator).to(dev)
                    for start in range(0, size, mini):
                        rows = order[start : start + mini]
                        mb_mask = m[rows]
                        mb_length = int(mb_mask.sum(-1).max())
                        ctx = am.shape[1] - length
                        mb_lead = min(int(first_true_indices(am[rows, :ctx].bool().any(0)[None])[0]), ctx - 1)
                        mb_qr, mb_am = qr[rows, mb_lead : ctx + mb_length], am[rows, mb_lead : ctx + mb_length]
                        mb_mask = mb_mask[:, :mb_length]
                        new_logprobs = logprobs_from_logits(
                            logits_of(policy, mb_qr, mb_am, mb_length), mb_qr[:, -mb_length:]
                        )
                        loss = clipped_policy_loss(
                            new_logprobs,
                            logprobs[rows, :mb_length],
                            advantages[rows, :mb_length],
                            mb_mask,
                            CLIP_LOW,
                            CLIP_HIGH,
                            ref_logprobs=ref_logprobs[rows, :mb_length],
                            kl_coef=KL_COEF,
                        ).loss
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, 1.0)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
            if timed:
                iteration.__exit__()
    return result(phases, len(batches) - 1, iteration.seconds, memory)


CASES = {"grpo": {"lit_rlhf": run_module, "floor": run_floor}}
