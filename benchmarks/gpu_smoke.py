"""GPU smoke run: a few steps of every stage in bf16 with LoRA + 4-bit, shared-base PPO (all four roles as
adapters of one 4-bit base), SFT under FSDP on one GPU, and GRPO with HF generate beside GRPO with vLLM rollouts
(``VLLMEngine``; only where vLLM is installed).

``python -m benchmarks.gpu_smoke`` on a CUDA machine prints, per run, the time per optimizer step (or PPO
iteration), throughput and peak GPU memory (``torch.cuda.max_memory_allocated`` over the run, to compare with
``python -m lit_rlhf.plan``). Offline: the model is the "gpu" benchmark preset (a ~160M
Llama built from a config) unless ``--model`` names a hub id or folder. ``--allow-cpu`` runs the non-FSDP
parts on the CPU (slowly) to check the script itself; FSDP always needs CUDA.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import time

import lightning as L
import torch

from benchmarks.common import CACHE, base_model_dir, data_dir
from lit_rlhf.cli import main as cli_main

QLORA = {
    "class_path": "lit_rlhf.callbacks.LoRAQuantization",
    "init_args": {"lora": {"r": 16, "alpha": 32}, "quantization": {"bits": 4, "compute_dtype": "bfloat16"}},
}


class Probe(L.Callback):
    """Seconds per training batch (after the first) and peak memory of the run."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.items = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if batch_idx >= 1:
            self.times.append(time.perf_counter() - self._t0)
            first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
            self.items += first.shape[0]


def run(name: str, config: str, args: list[str], callbacks: list[dict], steps: int, cpu: bool) -> tuple:
    probe = Probe()
    gc.collect()  # the previous run's models, so that each peak is its run's own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer_args = [
        # one training batch = one optimizer step (SFT, RM) or one PPO iteration
        "--trainer.max_steps=-1",
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={steps}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.accelerator={'cpu' if cpu else 'gpu'}",
        "--trainer.precision=bf16-mixed",
        f"--trainer.default_root_dir={CACHE / 'smoke' / name}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
    ]
    cli = cli_main(["--config", config, *trainer_args, *args], run=False)
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = sorted(probe.times)[len(probe.times) // 2] if probe.times else float("nan")
    result = {
        "run": name,
        "median_s_per_step": round(seconds, 4),
        "items_per_s": round(probe.items / sum(probe.times), 2) if probe.times else None,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
    }
    print(json.dumps(result), flush=True)
    return cli.model, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="hub id or folder (default: the offline 'gpu' preset)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--allow-cpu", action="store_true")
    args = parser.parse_args(argv)
    cpu = not torch.cuda.is_available()
    if cpu and not args.allow_cpu:
        raise SystemExit("no CUDA device: this smoke run is for GPUs (use --allow-cpu to check the script)")
    model = args.model or str(base_model_dir("gpu"))
    data = data_dir()
    sft = [
        "--model.init_args.model.name_or_path",
        model,
        "--model.init_args.model.dtype=bfloat16",
        f"--data.init_args.train_data={data / 'sft/train.jsonl'}",
        "--data.init_args.val_data=null",
    ]
    results = []
    module, r = run("sft-qlora", "configs/quickstart/sft.yaml", sft, [QLORA], args.steps, cpu)
    results.append(r)
    rm_export = CACHE / "smoke" / "rm-export"
    rm = [
        "--model.init_args.model.name_or_path",
        model,
        "--model.init_args.model.dtype=bfloat16",
        f"--data.init_args.train_data={data / 'rm/train.jsonl'}",
        "--data.init_args.val_data=null",
    ]
    module, r = run("rm-qlora", "configs/quickstart/rm.yaml", rm, [QLORA], args.steps, cpu)
    module.export_hf(rm_export)
    rm_adapter = CACHE / "smoke" / "rm-export-adapter"  # the same RM unmerged: the shared base's reward role
    module.export_hf(rm_adapter, merge_adapters=False)
    del module
    results.append(r)
    ppo = [
        "--model.init_args.policy.name_or_path",
        model,
        "--model.init_args.policy.dtype=bfloat16",
        "--model.init_args.critic.name_or_path",
        str(rm_export),
        "--model.init_args.reward_model.name_or_path",
        str(rm_export),
        f"--data.init_args.train_data={data / 'prompts/train.jsonl'}",
        "--data.init_args.val_data=null",
    ]
    reward_4bit = {
        "class_path": "lit_rlhf.callbacks.LoRAQuantization",
        "init_args": {"quantization": {"bits": 4, "compute_dtype": "bfloat16"}, "roles": ["reward_model"]},
    }
    results.append(run("ppo-qlora", "configs/quickstart/ppo.yaml", ppo, [QLORA, reward_4bit], args.steps, cpu)[1])
    # shared base: policy, critic and reward model as adapters of ONE 4-bit base, the reference = no adapter
    shared = [
        *ppo[:3],
        "--model.init_args.critic=null",
        "--model.init_args.reward_model=null",
        f"--model.init_args.shared_base.reward_adapter={rm_adapter}",
        "--model.init_args.policy.gradient_checkpointing=true",
        *ppo[7:],
    ]
    results.append(run("ppo-shared-base-4bit", "configs/quickstart/ppo.yaml", shared, [QLORA], args.steps, cpu)[1])
    if not cpu and importlib.util.find_spec("vllm") is not None:
        # the same GRPO iterations with each rollout engine: HF generate, then vLLM colocated on the same GPU
        grpo = [
            "--model.init_args.policy.name_or_path",
            model,
            "--model.init_args.policy.dtype=bfloat16",
            "--model.init_args.reward_model.name_or_path",
            str(rm_export),
            "--model.init_args.ptx=null",
            f"--data.init_args.train_data={data / 'prompts/train.jsonl'}",
            "--data.init_args.val_data=null",
        ]
        results.append(run("grpo-hf-generate", "configs/quickstart/grpo.yaml", grpo, [], args.steps, cpu)[1])
        vllm = [*grpo, "--model.init_args.engine=lit_rlhf.hf.vllm_engine.VLLMEngine"]
        results.append(run("grpo-vllm", "configs/quickstart/grpo.yaml", vllm, [], args.steps, cpu)[1])
    if not cpu:
        fsdp = [*sft, "--trainer.strategy=fsdp2", "--trainer.devices=1"]
        results.append(run("sft-fsdp2-1gpu", "configs/quickstart/sft.yaml", fsdp, [], args.steps, cpu)[1])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
