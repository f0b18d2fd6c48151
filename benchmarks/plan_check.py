"""Check the memory planner (``python -m lit_rlhf.plan``) against measured peaks on CPU.

For each model size and stage, this builds a random Llama-shaped model folder (and a reward-model export of it),
writes a stage YAML, runs ``lit_rlhf.cli.main(["fit", "--config", yaml])`` — what ``python -m lit_rlhf fit``
runs — for two training batches in a **fresh subprocess**, and compares the peak memory it measured with the
planner's CPU prediction for the same YAML (``--target cpu``).

Measured peak = the process's peak RSS (``ru_maxrss``) minus its RSS after importing everything the run needs
(torch, transformers' Llama classes, peft, Lightning, lit_rlhf), before the CLI starts. On CPU there is no
separate device memory, so this counts every live tensor plus what Python allocates on the side (the Trainer,
the data, the tokenizer: a few MiB). glibc is told to return freed blocks to the OS at once
(``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``, as ``benchmarks/ppo.py`` does with ``mallopt``), so the
peak RSS follows the live tensors instead of piling up freed ones.

Stages: ``sft``, ``rm``, ``ppo`` (four models), ``ppo_lora`` (LoRA policy + value head, separate reward model),
``ppo_shared`` and ``ppo_shared_4bit`` (one fp32 or 4-bit base carrying the policy, critic and reward adapters;
the reward adapter is a LoRA reward model on the same base exported unmerged, built once).

    python -m benchmarks.plan_check                       # every size and stage (minutes; needs ~8 GB RAM)
    python -m benchmarks.plan_check --sizes 5M --stages sft rm --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

SIZES = {
    # calibration only: its tensors are a few MiB, so its peak RSS growth is the runtime's own memory
    "0.2M": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256),
    # hidden, layers, heads, MLP width (multiples of 64 for bitsandbytes' CPU kernels)
    "5M": dict(hidden_size=256, num_layers=6, num_heads=4, intermediate_size=704),
    "30M": dict(hidden_size=512, num_layers=10, num_heads=8, intermediate_size=1408),
    "113M": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
}
STAGES = ("sft", "rm", "ppo", "ppo_lora", "ppo_shared", "ppo_shared_4bit")
#: the shared-base stages' adapters: the policy's LoRA and the reward model's (exported unmerged), r 16 all-linear
SHARED_LORA = {"r": 16, "alpha": 32}
ROOT = Path(os.environ.get("LIT_RLHF_BENCH_DIR", "runs/bench")) / "plan_check"
# workloads: SFT 8 rows x 256 tokens; RM 4 prompts x 2 responses of ~256 tokens; PPO 16 prompts x (16 + 16)
SFT_BATCH, SFT_LENGTH = 8, 256
RM_BATCH, RM_MICRO = 8, 4
PPO_PROMPTS, PPO_NEW_TOKENS, PPO_MICRO = 16, 16, 8
TRAINER = {
    "accelerator": "cpu",
    "devices": 1,
    "precision": "32-true",
    "max_epochs": 1,
    "limit_train_batches": 2,
    "limit_val_batches": 0,
    "num_sanity_val_steps": 0,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def build_models(size: str) -> tuple[Path, Path]:
    """The base causal LM and a reward-model export of it (scalar head), built once."""
    import torch

    from lit_rlhf.hf import ModelSpec, load_model, load_tokenizer
    from lit_rlhf.quickstart.assets import build_tiny_llama, build_tokenizer
    from lit_rlhf.quickstart.task import corpus

    base, rm = ROOT / f"base-{size}", ROOT / f"rm-{size}"
    if not (base / "config.json").exists():
        tokenizer = build_tokenizer(corpus(seed=0), vocab_size=512)
        build_tiny_llama(base, tokenizer, max_position_embeddings=1024, **SIZES[size])
    if not (rm / "config.json").exists():
        torch.manual_seed(0)
        spec = ModelSpec(str(base))
        tokenizer = load_tokenizer(spec)
        load_model(spec, tokenizer, "sequence_classifier", trainable=False).save_pretrained(rm)
        tokenizer.save_pretrained(rm)
    return base, rm


def build_rm_adapter(size: str, base: Path) -> Path:
    """A LoRA reward model on ``base`` exported unmerged by the reward-model stage (the shared-base runs' reward
    adapter), built once. Its weights are random: memory does not depend on them."""
    import torch

    from lit_rlhf.hf import LoraSpec, ModelSpec
    from lit_rlhf.models.reward import RewardModule

    path = ROOT / f"rm-adapter-{size}"
    if not (path / "adapter_config.json").exists():
        torch.manual_seed(0)
        module = RewardModule(ModelSpec(str(base), lora=LoraSpec(**SHARED_LORA)))
        module.configure_model()
        module.export_hf(path, merge_adapters=False)
    return path


def _text(words: int, seed: int) -> str:
    import random

    from lit_rlhf.quickstart.task import corpus

    vocabulary = " ".join(corpus(seed=0, n=200)).split()
    rng = random.Random(seed)
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def write_data(base: Path) -> dict[str, int]:
    """Data whose rows all have the same length, so every batch is full; returns the lengths for the YAMLs."""
    from lit_rlhf.datamodules import PreferenceDataModule, PromptDataModule
    from lit_rlhf.datamodules.base import write_jsonl
    from lit_rlhf.hf import load_tokenizer

    data = ROOT / "data"
    data.mkdir(parents=True, exist_ok=True)
    long = _text(400, 1)  # > SFT_LENGTH tokens: truncated to it
    write_jsonl(data / "sft.jsonl", [{"prompt": "The phone was", "completion": " " + long}] * 32)
    response = _text(110, 2)
    rows = [{"prompt": "The phone was", "chosen": " " + response + " good", "rejected": " " + response + " bad"}]
    write_jsonl(data / "rm.jsonl", rows * 32)
    write_jsonl(data / "prompts.jsonl", [{"prompt": _text(10, 3)}] * 64)
    tokenizer = load_tokenizer(str(base))
    lengths = {}
    for name, module in (("rm", PreferenceDataModule), ("prompts", PromptDataModule)):
        dm = module(
            str(data / f"{name}.jsonl"), batch_size=4, **{"max_length" if name == "rm" else "max_prompt_length": 4096}
        )
        dm.tokenizer = tokenizer
        dm.setup("fit")
        lengths[name] = max(_longest(example) for example in dm.train_dataset)
    return lengths


def _longest(value) -> int:
    if isinstance(value, dict):
        return max((_longest(v) for v in value.values()), default=0)
    if isinstance(value, list) and value and isinstance(value[0], int):
        return len(value)
    if isinstance(value, list):
        return max((_longest(v) for v in value), default=0)
    return 0


def stage_config(stage: str, base: Path, rm: Path, lengths: dict[str, int], rm_adapter: Path | None = None) -> dict:
    data = ROOT / "data"
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-5}}
    trainer = dict(TRAINER, default_root_dir=str(ROOT / f"run-{stage}"))  # where fit writes its config.yaml
    model_spec = {"name_or_path": str(base), "dtype": "float32"}
    if stage == "sft":
        model = {
            "class_path": "lit_rlhf.models.SFTModule",
            "init_args": {"model": model_spec, "micro_batch_size": SFT_BATCH, "optimizer": optimizer},
        }
        datamodule = {
            "class_path": "lit_rlhf.datamodules.SFTDataModule",
            "init_args": {"train_data": str(data / "sft.jsonl"), "max_length": SFT_LENGTH, "batch_size": SFT_BATCH},
        }
    elif stage == "rm":
        model = {
            "class_path": "lit_rlhf.models.RewardModule",
            "init_args": {"model": model_spec, "micro_batch_size": RM_MICRO, "optimizer": optimizer},
        }
        datamodule = {
            "class_path": "lit_rlhf.datamodules.PreferenceDataModule",
            "init_args": {"train_data": str(data / "rm.jsonl"), "max_length": lengths["rm"], "batch_size": RM_BATCH},
        }
    else:
        lora = stage == "ppo_lora"
        init_args = {
            "policy": model_spec,
            "reward_model": {"name_or_path": str(rm), "dtype": "float32"},
            "sampling": {"max_new_tokens": PPO_NEW_TOKENS},
            "ppo": {"ppo_epochs": 1, "num_mini_batches": 1, "micro_batch_size": PPO_MICRO},
            "optimizer": optimizer,
        }
        if stage.startswith("ppo_shared"):
            # one base: policy, critic (from the reward adapter) and reward adapters; reference = adapters off
            policy = dict(model_spec, lora=SHARED_LORA)
            if stage == "ppo_shared_4bit":
                policy["quantization"] = {"bits": 4, "compute_dtype": "float32"}
            init_args.update(policy=policy, reward_model=None, shared_base={"reward_adapter": str(rm_adapter)})
        elif lora:
            init_args["value_head"] = True
            trainer["callbacks"] = [
                {"class_path": "lit_rlhf.callbacks.LoRAQuantization", "init_args": {"lora": {"r": 16, "alpha": 32}}}
            ]
        else:
            init_args["critic"] = {"name_or_path": str(rm), "dtype": "float32"}
        model = {"class_path": "lit_rlhf.models.PPOModule", "init_args": init_args}
        datamodule = {
            "class_path": "lit_rlhf.datamodules.PromptDataModule",
            "init_args": {
                "train_data": str(data / "prompts.jsonl"),
                "max_prompt_length": lengths["prompts"],
                "batch_size": PPO_PROMPTS,
            },
        }
    return {"seed_everything": 0, "trainer": trainer, "model": model, "data": datamodule}


CHILD = r"""
import json, resource, sys
import psutil, torch, lightning, transformers, peft, bitsandbytes
from transformers.models.llama import modeling_llama  # noqa: F401  (imported lazily by from_pretrained)
import lit_rlhf.cli
baseline = psutil.Process().memory_info().rss
lit_rlhf.cli.main(["fit", "--config", sys.argv[1]])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("PLAN_CHECK " + json.dumps({"baseline": baseline, "peak": peak}))
"""


def measure(config_path: Path) -> float:
    """Peak RSS growth (MiB) of a fresh ``fit`` run of ``config_path``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="1048576")
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(config_path)], env=env, capture_output=True, text=True, check=False
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("PLAN_CHECK ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"fit failed for {config_path}:\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("PLAN_CHECK "))
    return (result["peak"] - result["baseline"]) / 2**20


def planned(config_path: Path) -> tuple[float, str]:
    """The planner's CPU peak (MiB) and peak phase for ``config_path``."""
    from lit_rlhf.plan import _read_config, run_from_config

    config, module, data = _read_config(["--config", str(config_path)])
    run, _ = run_from_config(config, module, data, "cpu", False, 2)
    plan = run.plan()
    return plan.peak / 2**20, plan.peak_phase


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["5M", "30M", "113M"], choices=list(SIZES))
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    parser.add_argument(
        "--replan", type=Path, nargs="+", default=None, help="reuse the measurements of these --json files, plan again"
    )
    args = parser.parse_args(argv)
    rows = []
    print("| size | parameters | stage | planned peak (phase) | measured peak | planned / measured |")
    print("|---|---|---|---|---|---|")
    if args.replan:
        for row in (row for path in args.replan for row in json.loads(path.read_text())):
            row["planned_mib"], row["phase"] = planned(ROOT / f"{row['stage']}-{row['size']}.yaml")
            row["ratio"] = row["planned_mib"] / row["measured_mib"]
            rows.append(row)
            print(
                f"| {row['size']} | {row['parameters'] / 1e6:.1f} M | {row['stage']} | {row['planned_mib']:.0f} MiB "
                f"({row['phase']}) | {row['measured_mib']:.0f} MiB | {row['ratio']:.2f} |"
            )
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=2))
        return
    for size in args.sizes:
        base, rm = build_models(size)
        lengths = write_data(base)
        from transformers import AutoConfig

        from lit_rlhf.planning.memory import Architecture

        params = Architecture.from_config(AutoConfig.from_pretrained(base)).num_parameters()
        for stage in args.stages:
            path = ROOT / f"{stage}-{size}.yaml"
            rm_adapter = build_rm_adapter(size, base) if stage.startswith("ppo_shared") else None
            path.write_text(yaml.safe_dump(stage_config(stage, base, rm, lengths, rm_adapter), sort_keys=False))
            plan_mib, phase = planned(path)
            measured_mib = measure(path)
            ratio = plan_mib / measured_mib
            rows.append(
                dict(
                    size=size,
                    parameters=params,
                    stage=stage,
                    planned_mib=plan_mib,
                    phase=phase,
                    measured_mib=measured_mib,
                    ratio=ratio,
                )
            )
            print(
                f"| {size} | {params / 1e6:.1f} M | {stage} | {plan_mib:.0f} MiB ({phase}) | {measured_mib:.0f} MiB"
                f" | {ratio:.2f} |",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
