"""PPO: seconds per iteration (generation, scoring, optimisation) and peak memory of ``PPOModule`` under the
Trainer, beside a plain-PyTorch loop doing the same passes, for two setups on the same base model:

* ``ppo`` — the full four-model setup: trainable policy, frozen reference copy, trainable critic initialised
  from the reward-model export, frozen reward model;
* ``ppo_lora`` — LoRA policy whose reference is the same weights with the adapter disabled (one base), a
  zero-initialised **value head** on the policy as the critic (no second network), frozen reward model.

The phases of ``PPOModule`` are timed from outside, by wrapping its methods on the instance (``generate`` →
generation, ``_rollout_forwards`` → scoring, ``ppo_update`` → optimisation); the library holds no timing code.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import shutil

import lightning as L
import torch
from torch import nn

from benchmarks.common import PRESETS, PeakMemory, Timer, base_model_dir, bench_trainer, data_dir, device
from lit_rlhf import ModelSpec
from lit_rlhf.datamodules import PromptDataModule
from lit_rlhf.hf.loading import load_model, load_tokenizer
from lit_rlhf.hf.reward import RewardScorer
from lit_rlhf.hf.specs import LoraSpec
from lit_rlhf.models import ppo as ppo_lib
from lit_rlhf.models.ppo import PPOConfig, PPOModule, SamplingConfig
from lit_rlhf.rlhf import (
    entropy_from_logits,
    first_true_indices,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    truncate_after_eos,
)

ITERATIONS = {"cpu": 3, "mid": 1, "mid32k": 1, "gpu": 5}  # timed PPO iterations, after one untimed warm-up iteration
LORA = LoraSpec(r=16, alpha=32)
LR, KL_COEF, VF_COEF, CLIP, VALUE_CLIP, GAMMA, LAM = 1e-5, 0.05, 0.1, 0.2, 0.2, 1.0, 0.95
PHASES = ("generation", "scoring", "optimisation")
SCORING = ("policy", "reference", "values", "reward")


# ---- inputs -----------------------------------------------------------------------------------------
def rm_dir(preset: str):
    """The reward-model export (and critic initialisation): the base model with a scalar head, built once."""
    base_dir = base_model_dir(preset)
    path = base_dir.parent / base_dir.name.replace("base-", "rm-", 1)  # one export per base model
    if not (path / "config.json").exists():
        base = ModelSpec(str(base_dir))
        tokenizer = load_tokenizer(base)
        torch.manual_seed(1)
        partial = path.with_name(path.name + ".partial")  # renamed when complete: no half-written export
        shutil.rmtree(partial, ignore_errors=True)
        load_model(base, tokenizer, "sequence_classifier", trainable=False).save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(path)
    return path


def prompt_data(preset: str) -> PromptDataModule:
    return PromptDataModule(str(data_dir() / "prompts" / "train.jsonl"), batch_size=PRESETS[preset]["prompts"])


def prompt_batches(preset: str, tokenizer) -> list[dict]:
    """The batches the Trainer run sees (same data module, same seed, first epoch)."""
    dm = prompt_data(preset)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    return [next(loader) for _ in range(ITERATIONS[preset] + 1)]


def preload() -> None:
    """Import everything lazily imported by model loading before memory is measured, so that the peak-memory
    figures hold models and tensors, not Python modules (peft, the Llama classes)."""
    import peft  # noqa: F401
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification  # noqa: F401


def return_freed_memory() -> None:
    """On CPU, make freed tensors go back to the OS at once, so the peak RSS follows the live tensors.

    glibc otherwise raises its mmap threshold after the first large free and keeps later tensors in its heap,
    where freed memory stays resident: the peak RSS then sums the high-water marks of generation, scoring and
    the update instead of their maximum, which blurs the full vs LoRA comparison. Applied to every PPO variant.
    """
    if torch.cuda.is_available():
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: blocks >= 64 KiB are mmap-ed, unmapped on free
    libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD: return the heap top above 1 MiB


def result(phases: dict[str, float], iterations: int, iteration_s: float, memory: PeakMemory) -> dict[str, float]:
    out = {"seconds_per_iteration": iteration_s / iterations}
    out.update({f"{name}_s": phases.get(name, 0.0) / iterations for name in PHASES})
    out["other_s"] = out["seconds_per_iteration"] - sum(out[f"{name}_s"] for name in PHASES)
    out.update({f"scoring_{name}_s": phases.get(f"scoring_{name}", 0.0) / iterations for name in SCORING})
    out["peak_mib"] = memory.mib
    return out


# ---- lit_rlhf ---------------------------------------------------------------------------------------
class Phases(L.Callback):
    """Times each training batch (= one PPO iteration) after the first and the module's phases inside it."""

    def __init__(self) -> None:
        self.iteration, self.seconds, self.iterations = Timer(), {}, 0
        self.active, self.stack = False, []

    def section(self, name: str, inside: str | None = None):
        """A timer for ``name``, counted only in timed iterations (and only within ``inside`` if given)."""
        if not self.active or (inside is not None and self.stack[-1:] != [inside]):
            return contextlib.nullcontext()
        phases = self

        class Section(Timer):
            def __enter__(self):
                phases.stack.append(name)
                return super().__enter__()

            def __exit__(self, *exc):
                super().__exit__(*exc)
                phases.stack.pop()
                phases.seconds[name] = phases.seconds.get(name, 0.0) + self.seconds

        return Section()

    def instrument(self, module: PPOModule) -> None:
        def wrap(fn, name, inside=None):
            def timed(*args, **kwargs):
                with self.section(name, inside):
                    return fn(*args, **kwargs)

            return timed

        module.generate = wrap(module.generate, "generation")
        module._rollout_forwards = wrap(module._rollout_forwards, "scoring")
        module.ppo_update = wrap(module.ppo_update, "optimisation")
        policy_forward = module.policy_forward

        def timed_policy_forward(*args, reference=False, **kwargs):
            with self.section("scoring_reference" if reference else "scoring_policy", "scoring"):
                return policy_forward(*args, reference=reference, **kwargs)

        module.policy_forward = timed_policy_forward
        module.values = wrap(module.values, "scoring_values", "scoring")
        # the reward model scores through its RewardScorer (built with the models, so patched on the class)
        RewardScorer.score_rollout = wrap(RewardScorer.score_rollout, "scoring_reward", "scoring")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx >= 1:
            self.active = True
            self.iteration.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= 1:
            self.iteration.__exit__()
            self.active = False
            self.iterations += 1


def _run_module(preset: str, lora: bool) -> dict[str, float]:
    p = PRESETS[preset]
    base, rm = str(base_model_dir(preset)), str(rm_dir(preset))
    preload()
    return_freed_memory()
    phases = Phases()
    with PeakMemory() as memory:
        module = PPOModule(
            policy=ModelSpec(base, lora=LORA if lora else None),
            critic=None if lora else ModelSpec(rm),
            value_head=lora,
            reward_model=ModelSpec(rm),
            sampling=SamplingConfig(max_new_tokens=p["new_tokens"]),
            ppo=PPOConfig(
                ppo_epochs=p["ppo_epochs"],
                num_mini_batches=p["minibatches"],
                vf_coef=VF_COEF,
                clip_range=CLIP,
                value_clip_range=VALUE_CLIP,
                gamma=GAMMA,
                lam=LAM,
            ),
            kl=ppo_lib.KLConfig(coef=KL_COEF),
            optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
        )
        phases.instrument(module)
        bench_trainer([phases], max_epochs=1, limit_train_batches=ITERATIONS[preset] + 1).fit(
            module, datamodule=prompt_data(preset)
        )
    assert phases.iterations == ITERATIONS[preset]
    return result(phases.seconds, phases.iterations, phases.iteration.seconds, memory)


def run_full(preset: str) -> dict[str, float]:
    return _run_module(preset, lora=False)


def run_lora(preset: str) -> dict[str, float]:
    return _run_module(preset, lora=True)


# ---- floor ------------------------------------------------------------------------------------------
def _forward(model, ids, mask, **kwargs):
    """A forward pass with position ids from the mask and no KV cache (as every PPO forward needs)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **kwargs)


def _head_scores(model, ids, mask):
    """Per-position outputs ``[B, L]`` of a decoder classifier's scalar head."""
    hidden = _forward(model, ids, mask, output_hidden_states=True).hidden_states[-1]
    return model.score(hidden).squeeze(-1).float()


def _run_floor(preset: str, lora: bool) -> dict[str, float]:
    p = PRESETS[preset]
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
        policy = load_model(ModelSpec(base, lora=LORA if lora else None), tok, "causal_lm", trainable=True).to(dev)
        reference = None if lora else load_model(ModelSpec(base), tok, "causal_lm", trainable=False).to(dev)
        if lora:
            critic = None
            value_head = nn.Linear(policy.config.hidden_size, 1).to(dev)
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
        else:
            critic = load_model(ModelSpec(rm), tok, "sequence_classifier", trainable=True).to(dev)
        reward_model = load_model(ModelSpec(rm), tok, "sequence_classifier", trainable=False).to(dev)
        params = [q for m in (policy, critic or value_head) for q in m.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR)

        def policy_pass(ids, mask, length):
            """Response logits (and value-head values in LoRA mode) of the policy."""
            out = _forward(policy, ids, mask, logits_to_keep=length + 1, output_hidden_states=lora)
            values = None
            if lora:
                values = value_head(out.hidden_states[-1][:, -length - 1 : -1]).squeeze(-1).float()
            return out.logits[:, :-1], values

        for it, batch in enumerate(batches):
            timed = it >= 1
            if timed:
                iteration.__enter__()
            prompt_ids, prompt_mask = batch["prompt_input_ids"].to(dev), batch["prompt_attention_mask"].to(dev)
            with section("generation", timed), torch.no_grad():
                policy.eval()
                with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                    torch.manual_seed(it * 7919)  # PPOModule's seed for iteration `it`
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
                length = int(mask.sum(-1).max())  # no column past the longest response
                qr, am, m = qr[:, lead : context + length], am[:, lead : context + length], mask[:, :length]
                tokens = qr[:, -length:]
                with section("scoring", timed):
                    with section("scoring_policy", timed):
                        logits, head_values = policy_pass(qr, am, length)
                        logprobs = logprobs_from_logits(logits, tokens)
                        entropy = entropy_from_logits(logits)  # noqa: F841  (the module logs it)
                    with section("scoring_reference", timed):
                        if lora:
                            with policy.disable_adapter():
                                ref_logits = _forward(policy, qr, am, logits_to_keep=length + 1).logits[:, :-1]
                        else:
                            ref_logits = _forward(reference, qr, am, logits_to_keep=length + 1).logits[:, :-1]
                        ref_logprobs = logprobs_from_logits(ref_logits, tokens)
                    with section("scoring_values", timed):
                        values = head_values if lora else _head_scores(critic, qr, am)[:, -length - 1 : -1]
                    with section("scoring_reward", timed):
                        last_real = (torch.arange(am.shape[1], device=dev) * am).argmax(-1)
                        scores = _head_scores(reward_model, qr, am).gather(1, last_real[:, None]).squeeze(1)
                per_token = (logprobs, ref_logprobs, values)
                logprobs, ref_logprobs, values = (torch.where(m, t.float(), 0) for t in per_token)
                kl = kl_penalty(logprobs, ref_logprobs).masked_fill(~m, 0)
                rewards, _ = per_token_rewards(kl, scores, last, KL_COEF, m)
                advantages, returns = gae(rewards, values, m, GAMMA, LAM)
                advantages = masked_whiten(advantages, m).masked_fill(~m, 0)

            with section("optimisation", timed):
                size, mini = len(qr), math.ceil(len(qr) / p["minibatches"])
                generator = torch.Generator().manual_seed(it)
                for _ in range(p["ppo_epochs"]):
                    order = torch.randperm(size, generator=generator).to(dev)
                    for start in range(0, size, mini):
                        rows = order[start : start + mini]
                        mb_mask = m[rows]
                        mb_length = int(mb_mask.sum(-1).max())  # trim to the minibatch's longest response
                        ctx = am.shape[1] - length
                        mb_lead = min(int(first_true_indices(am[rows, :ctx].bool().any(0)[None])[0]), ctx - 1)
                        mb_qr, mb_am = qr[rows, mb_lead : ctx + mb_length], am[rows, mb_lead : ctx + mb_length]
                        mb_mask = mb_mask[:, :mb_length]
                        new_logits, new_head_values = policy_pass(mb_qr, mb_am, mb_length)
                        new_logprobs = logprobs_from_logits(new_logits, mb_qr[:, -mb_length:])
                        if lora:
                            new_values = new_head_values
                        else:
                            new_values = _head_scores(critic, mb_qr, mb_am)[:, -mb_length - 1 : -1]
                        tokens_in_mb = mb_mask.sum().float()
                        pg = ppo_policy_loss(
                            new_logprobs,
                            logprobs[rows, :mb_length],
                            advantages[rows, :mb_length],
                            mb_mask,
                            CLIP,
                            tokens_in_mb,
                        )
                        vf = ppo_value_loss(
                            new_values,
                            values[rows, :mb_length],
                            returns[rows, :mb_length],
                            mb_mask,
                            VALUE_CLIP,
                            tokens_in_mb,
                        )
                        (pg.loss + VF_COEF * vf.loss).backward()
                        torch.nn.utils.clip_grad_norm_(params, 1.0)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
            if timed:
                iteration.__exit__()
    return result(phases, len(batches) - 1, iteration.seconds, memory)


def run_full_floor(preset: str) -> dict[str, float]:
    return _run_floor(preset, lora=False)


def run_lora_floor(preset: str) -> dict[str, float]:
    return _run_floor(preset, lora=True)


CASES = {
    "ppo": {"lit_rlhf": run_full, "floor": run_full_floor},
    "ppo_lora": {"lit_rlhf": run_lora, "floor": run_lora_floor},
}
