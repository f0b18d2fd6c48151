"""The offline quickstart: ``python -m lit_rlhf.quickstart`` (what ``make demo`` runs).

1. prepares the inputs under ``runs/quickstart/``: the seeded task data, a byte-level BPE tokenizer trained
   on the task corpus, and a randomly initialised tiny Llama saved as a Hugging Face folder (the "pretrained"
   model every stage loads through the same path a hub model takes);
2. runs each stage exactly as a user would, ``python -m lit_rlhf fit --config configs/quickstart/<stage>.yaml``,
   each reading the previous stage's export;
3. prints a one-line summary per stage;
4. evaluates SFT and PPO on held-out prompts with the reward model and the gold judge (VADER), and writes
   ``runs/quickstart/report/report.md`` with PNG curves.

Everything it writes is regenerated deterministically from seeds; existing outputs are replaced, and every
replacement is announced.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lit_rlhf.quickstart.assets import build_tiny_llama, build_tokenizer
from lit_rlhf.quickstart.task import corpus, write_quickstart_data

RUN_DIR = Path("runs/quickstart")
CONFIG_DIR = Path("configs/quickstart")
STAGES = ("sft", "rm", "ppo")
#: metric shown in each stage's summary line, read from its CSV log
SUMMARY_METRICS = {
    "sft": ("val/loss", "val/perplexity", "val/token_accuracy"),
    "rm": ("val/accuracy",),
    "ppo": ("objective/score", "objective/kl"),
}
BASE_MODEL = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384)
#: --smoke: the same pipeline on a sliver of data and steps (what the test suite runs); proves nothing else
SMOKE_DATA = dict(n_sft_train=128, n_sft_val=32, n_rank_train=64, n_rank_val=32, n_prompts_train=64, n_prompts_eval=8)
SMOKE_OVERRIDES = {
    "sft": ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1"],
    "rm": ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"],
    "ppo": [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.val_check_interval=1.0",
        "--trainer.limit_val_batches=1",
        "--data.init_args.batch_size=8",
    ],
}


def announce_replace(path: Path) -> None:
    if path.exists():
        print(f"[quickstart] replacing existing {path}")
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def prepare(seed: int = 0, smoke: bool = False) -> None:
    """Write the task data, the tokenizer and the tiny base model under ``runs/quickstart``."""
    announce_replace(RUN_DIR / "data")
    paths = write_quickstart_data(RUN_DIR / "data", seed=seed, **(SMOKE_DATA if smoke else {}))
    print(f"[quickstart] task data: {len(paths)} files under {RUN_DIR / 'data'}")
    announce_replace(RUN_DIR / "base")
    tokenizer = build_tokenizer(corpus(seed=seed), vocab_size=512)
    build_tiny_llama(RUN_DIR / "base", tokenizer, seed=seed, **BASE_MODEL)
    print(f"[quickstart] tiny Llama {BASE_MODEL} with a {len(tokenizer)}-token BPE tokenizer: {RUN_DIR / 'base'}")


def last_metrics(stage: str) -> dict[str, float]:
    """Last logged value of every metric in a stage's CSV log."""
    values: dict[str, float] = {}
    for path in sorted((RUN_DIR / stage / "logs").rglob("metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                values.update(
                    {k: float(v) for k, v in row.items() if v not in ("", None) and k not in ("step", "epoch")}
                )
    return values


def run_stage(stage: str, overrides: list[str] = ()) -> float:
    config = CONFIG_DIR / f"{stage}.yaml"
    for output in ("logs", "checkpoints", "export"):
        announce_replace(RUN_DIR / stage / output)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lit_rlhf", "fit", "--config", str(config), *overrides], check=True)
    seconds = time.perf_counter() - start
    metrics = last_metrics(stage)
    shown = ", ".join(f"{k}={metrics[k]:.3f}" for k in SUMMARY_METRICS.get(stage, ()) if k in metrics)
    print(f"[quickstart] {stage}: {seconds:.0f}s, {shown}, export {RUN_DIR / stage / 'export'}")
    return seconds


def evaluate_and_report(timings: dict[str, float], num_samples: int = 4) -> None:
    """Held-out comparison of the SFT and PPO policies, then the report."""
    from lit_rlhf.evaluation import evaluate
    from lit_rlhf.quickstart.report import check_targets, headline, read_metrics, write_report

    start = time.perf_counter()
    announce_replace(RUN_DIR / "report")
    evaluation = evaluate(
        policy=str(RUN_DIR / "ppo" / "export"),
        baseline=str(RUN_DIR / "sft" / "export"),
        reference=str(RUN_DIR / "sft" / "export"),
        reward_model=str(RUN_DIR / "rm" / "export"),
        reward_fn="lit_rlhf.quickstart.task:gold_scores",
        prompts=str(RUN_DIR / "data" / "prompts" / "eval.jsonl"),
        num_samples=num_samples,
        output_dir=str(RUN_DIR / "report"),
    )
    timings["evaluation"] = time.perf_counter() - start
    report = write_report(RUN_DIR, evaluation, timings, machine_description())
    rm_val = read_metrics(RUN_DIR / "rm" / "logs").get("val/accuracy")
    for label, value, ok in check_targets(headline(evaluation.summary, rm_val[-1][1] if rm_val else None)):
        print(f"[quickstart] {'PASS' if ok else 'MISS'} {label}: {value:.3f}")
    print(f"[quickstart] report: {report}")


def machine_description() -> str:
    import os
    import platform

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()} {os.cpu_count()} cores, {device}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_rlhf.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run")
    parser.add_argument("--prepare-only", action="store_true", help="write data and base model, train nothing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps of each stage on a sliver of data")
    args = parser.parse_args(argv)
    if not CONFIG_DIR.is_dir():
        sys.exit(f"{CONFIG_DIR} not found: run the quickstart from the repository root.")
    prepare(args.seed, smoke=args.smoke)
    if args.prepare_only:
        return
    timings = {stage: run_stage(stage, SMOKE_OVERRIDES[stage] if args.smoke else []) for stage in args.stages}
    if set(STAGES) <= set(args.stages):
        evaluate_and_report(timings, num_samples=1 if args.smoke else 4)


if __name__ == "__main__":
    from lit_rlhf.errors import run_command

    run_command(main)
