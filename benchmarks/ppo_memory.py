"""PPO memory: the same PPO iteration in four model setups, peak memory and seconds per iteration side by side
(issue 16; run it at ``--preset mid``: a 113M-parameter Llama, 16 prompts × 16 new tokens, 1 epoch, micro-batch 8):

* ``four_model`` — trainable policy, frozen reference copy, trainable critic initialised from the reward-model
  export, frozen reward model: four networks;
* ``lora_value_head`` — LoRA policy whose reference is the base with the adapter disabled, a value head on the
  policy as the critic, and a separate frozen reward model: two networks;
* ``shared_base`` — one base in the same dtype carrying the ``policy``, ``critic`` and ``reward_model`` LoRA
  adapters (the reward adapter exported unmerged by the reward-model stage); reference = adapters disabled;
* ``shared_base_4bit`` — the same on a 4-bit NF4 base;
* ``floor`` — the plain-PyTorch loop of ``benchmarks/ppo.py`` for the four-model setup.

Every run is a fresh subprocess (``python -m benchmarks``), so each peak is its own. The phases are timed from
outside as in ``benchmarks/ppo.py``. ``python -m benchmarks.ppo_memory VARIANT [PRESET]`` shows where one variant
peaks: the largest RSS (MiB over the start) while loading and in each phase of the run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time

import torch

from benchmarks.common import PRESETS, PeakMemory, base_model_dir, bench_trainer
from benchmarks.ppo import (
    CLIP,
    GAMMA,
    ITERATIONS,
    KL_COEF,
    LAM,
    LORA,
    LR,
    VALUE_CLIP,
    VF_COEF,
    Phases,
    preload,
    prompt_data,
    result,
    return_freed_memory,
    rm_dir,
    run_full_floor,
)
from lit_rlhf import ModelSpec
from lit_rlhf.hf.specs import QuantizationSpec
from lit_rlhf.models import ppo as ppo_lib
from lit_rlhf.models.ppo import PPOConfig, PPOModule, SamplingConfig, SharedBaseConfig

FOUR_BIT = QuantizationSpec(bits=4, compute_dtype="float32")  # NF4 weights, float32 matmuls (CPU)


def rm_adapter_dir(preset: str):
    """A LoRA reward model on the benchmark base, exported unmerged by the reward-model stage (built once)."""
    from lit_rlhf.models.reward import RewardModule

    base_dir = base_model_dir(preset)
    path = base_dir.parent / base_dir.name.replace("base-", "rm-adapter-", 1)
    if not (path / "adapter_config.json").exists():
        torch.manual_seed(1)
        module = RewardModule(ModelSpec(str(base_dir), lora=LORA))
        module.configure_model()
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")  # renamed when complete
        module.export_hf(partial, merge_adapters=False)
        try:
            partial.rename(path)
        except OSError:  # another process finished the same export first
            shutil.rmtree(partial, ignore_errors=True)
    return path


def _module(preset: str, setup: str) -> PPOModule:
    p = PRESETS[preset]
    base, rm = str(base_model_dir(preset)), str(rm_dir(preset))
    kwargs: dict = {}
    if setup == "four_model":
        kwargs = dict(policy=ModelSpec(base), critic=ModelSpec(rm), reward_model=ModelSpec(rm))
    elif setup == "lora_value_head":
        kwargs = dict(policy=ModelSpec(base, lora=LORA), value_head=True, reward_model=ModelSpec(rm))
    else:
        quantization = FOUR_BIT if setup == "shared_base_4bit" else None
        kwargs = dict(
            policy=ModelSpec(base, lora=LORA, quantization=quantization),
            shared_base=SharedBaseConfig(reward_adapter=str(rm_adapter_dir(preset))),
        )
    return PPOModule(
        **kwargs,
        sampling=SamplingConfig(max_new_tokens=p["new_tokens"]),
        ppo=PPOConfig(
            ppo_epochs=p["ppo_epochs"],
            num_mini_batches=p["minibatches"],
            micro_batch_size=p.get("micro_batch_size"),
            vf_coef=VF_COEF,
            clip_range=CLIP,
            value_clip_range=VALUE_CLIP,
            gamma=GAMMA,
            lam=LAM,
        ),
        kl=ppo_lib.KLConfig(coef=KL_COEF),
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
    )


def _run(preset: str, setup: str) -> dict[str, float]:
    if setup != "four_model" and setup != "lora_value_head":
        rm_adapter_dir(preset)  # built before the measured block
    rm_dir(preset)
    preload()
    return_freed_memory()
    phases = Phases()
    with PeakMemory() as memory:
        module = _module(preset, setup)
        phases.instrument(module)
        bench_trainer([phases], max_epochs=1, limit_train_batches=ITERATIONS[preset] + 1).fit(
            module, datamodule=prompt_data(preset)
        )
    assert phases.iterations == ITERATIONS[preset]
    return result(phases.seconds, phases.iterations, phases.iteration.seconds, memory)


CASES = {
    "ppo_memory": {
        "four_model": lambda preset: _run(preset, "four_model"),
        "lora_value_head": lambda preset: _run(preset, "lora_value_head"),
        "shared_base": lambda preset: _run(preset, "shared_base"),
        "shared_base_4bit": lambda preset: _run(preset, "shared_base_4bit"),
        "floor": run_full_floor,
    }
}


def phase_peaks(preset: str, setup: str, interval: float = 0.005) -> dict[str, float]:
    """Largest RSS growth (MiB) while the models load (``configure_model``), in ``sample``, ``_rollout_forwards``,
    ``ppo_update`` and the rest of ``fit``, sampled every ``interval`` seconds in a thread; ``peak`` is the
    block's ``peak_mib`` (peak RSS growth), as the benchmark measures it."""
    import psutil

    if setup not in ("four_model", "lora_value_head"):
        rm_adapter_dir(preset)
    rm_dir(preset)
    preload()
    return_freed_memory()
    process, state = psutil.Process(), {"phase": "fit", "peaks": {}, "running": True}

    def sample() -> None:
        while state["running"]:
            rss, phase = process.memory_info().rss, state["phase"]
            state["peaks"][phase] = max(state["peaks"].get(phase, 0), rss)
            time.sleep(interval)

    def labelled(fn, phase: str):
        def run(*args, **kwargs):
            outer, state["phase"] = state["phase"], phase
            try:
                return fn(*args, **kwargs)
            finally:
                state["phase"] = outer

        return run

    with PeakMemory() as memory:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        module = _module(preset, setup)
        for name, phase in (
            ("configure_model", "loading"),
            ("generate", "generation"),
            ("_rollout_forwards", "scoring"),
            ("ppo_update", "update"),
        ):
            setattr(module, name, labelled(getattr(module, name), phase))
        bench_trainer([], max_epochs=1, limit_train_batches=ITERATIONS[preset] + 1).fit(
            module, datamodule=prompt_data(preset)
        )
        state["running"] = False
        sampler.join()
    out = {phase: (rss - memory.start) / 2**20 for phase, rss in state["peaks"].items()}
    out["peak"] = memory.mib
    return out


if __name__ == "__main__":
    variant, preset = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "mid")
    print(json.dumps({k: round(v) for k, v in phase_peaks(preset, variant).items()}))
