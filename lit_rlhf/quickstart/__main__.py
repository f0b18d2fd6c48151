"""The offline quickstart: ``python -m lit_rlhf.quickstart`` (what ``make demo`` runs).

1. prepares the inputs under ``runs/quickstart/``: the seeded task data, a byte-level BPE tokenizer trained
   on the task corpus, and a randomly initialised tiny Llama saved as a Hugging Face folder (the "pretrained"
   model every stage loads through the same path a hub model takes);
2. runs each stage exactly as a user would, ``python -m lit_rlhf fit --config configs/quickstart/<stage>.yaml``,
   each reading the previous stage's export;
3. prints a one-line summary per stage.

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


def announce_replace(path: Path) -> None:
    if path.exists():
        print(f"[quickstart] replacing existing {path}")
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def prepare(seed: int = 0) -> None:
    """Write the task data, the tokenizer and the tiny base model under ``runs/quickstart``."""
    announce_replace(RUN_DIR / "data")
    paths = write_quickstart_data(RUN_DIR / "data", seed=seed)
    print(f"[quickstart] task data: {len(paths)} files under {RUN_DIR / 'data'}")
    announce_replace(RUN_DIR / "base")
    tokenizer = build_tokenizer(corpus(seed=seed), vocab_size=512)
    build_tiny_llama(RUN_DIR / "base", tokenizer, seed=seed, **BASE_MODEL)
    print(
        f"[quickstart] tiny Llama {BASE_MODEL} with a {len(tokenizer)}-token BPE tokenizer: {RUN_DIR / 'base'}"
    )


def last_metrics(stage: str) -> dict[str, float]:
    """Last logged value of every metric in a stage's CSV log."""
    values: dict[str, float] = {}
    for path in sorted((RUN_DIR / stage / "logs").rglob("metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                values.update(
                    {
                        k: float(v)
                        for k, v in row.items()
                        if v not in ("", None) and k not in ("step", "epoch")
                    }
                )
    return values


def run_stage(stage: str) -> None:
    config = CONFIG_DIR / f"{stage}.yaml"
    for output in ("logs", "checkpoints", "export"):
        announce_replace(RUN_DIR / stage / output)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lit_rlhf", "fit", "--config", str(config)], check=True)
    metrics = last_metrics(stage)
    shown = ", ".join(f"{k}={metrics[k]:.3f}" for k in SUMMARY_METRICS.get(stage, ()) if k in metrics)
    print(
        f"[quickstart] {stage}: {time.perf_counter() - start:.0f}s, {shown}, export {RUN_DIR / stage / 'export'}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_rlhf.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run")
    parser.add_argument(
        "--prepare-only", action="store_true", help="write data and base model, train nothing"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not CONFIG_DIR.is_dir():
        sys.exit(f"{CONFIG_DIR} not found: run the quickstart from the repository root.")
    prepare(args.seed)
    if args.prepare_only:
        return
    for stage in args.stages:
        run_stage(stage)


if __name__ == "__main__":
    main()
