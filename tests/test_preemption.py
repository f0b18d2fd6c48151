"""A pre-empted run of each quickstart stage, resumed with ``--ckpt_path last``, equals the uninterrupted run.

The shipped configs are used unchanged: each run happens in its own working directory holding tiny data and
models at the paths the configs name (``runs/quickstart/...``). Only run lengths, validation frequency and
the logging interval are overridden (none of them changes what is trained).
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_rlhf.quickstart.task import prompt_examples, ranking_examples, sft_examples
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart"
#: exit status of a run stopped by SIGTERM / Ctrl-C after saving a resumable checkpoint (README)
EXIT_PREEMPTED = 75

# per stage: overrides (run length, validation and logging frequency only), batches before the SIGTERM,
# training batches of the whole run, and the model the stage starts from
STAGES = {
    "sft": (["--trainer.max_epochs=2", "--trainer.log_every_n_steps=1"], 3, 8, "base"),
    "rm": (["--trainer.max_epochs=2", "--trainer.log_every_n_steps=1"], 2, 6, "sft/export"),
    "ppo": (
        ["--trainer.max_epochs=1", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"],
        2,
        5,
        "sft/export",
    ),
}


@pytest.fixture(scope="module")
def quickstart_layout(tmp_path_factory, tiny_model_dir, tiny_classifier_dir) -> Path:
    """``runs/quickstart/`` with tiny data, a tiny base model and tiny SFT/RM exports, as the configs expect."""
    root = tmp_path_factory.mktemp("layout")
    data = root / "runs" / "quickstart" / "data"
    write_jsonl(data / "sft" / "train.jsonl", sft_examples(128, seed=1))  # 4 batches of 32 an epoch
    write_jsonl(data / "sft" / "val.jsonl", sft_examples(16, seed=2))
    write_jsonl(data / "rm" / "train.jsonl", ranking_examples(96, seed=3))  # 3 batches an epoch
    write_jsonl(data / "rm" / "val.jsonl", ranking_examples(16, seed=4))
    write_jsonl(data / "prompts" / "train.jsonl", prompt_examples(160, seed=5))  # 5 iterations
    write_jsonl(data / "prompts" / "eval.jsonl", prompt_examples(32, seed=6))
    shutil.copytree(tiny_model_dir, root / "runs" / "quickstart" / "base")
    shutil.copytree(tiny_model_dir, root / "runs" / "quickstart" / "sft" / "export")
    shutil.copytree(tiny_classifier_dir, root / "runs" / "quickstart" / "rm" / "export")
    return root


def workdir(layout: Path, path: Path) -> Path:
    shutil.copytree(layout, path)
    return path


def command(stage: str, *extra: str) -> list[str]:
    overrides = STAGES[stage][0]
    return [sys.executable, "-m", "lit_rlhf", "fit", "--config", str(QUICKSTART / f"{stage}.yaml"), *overrides, *extra]


def announce(sleep: float) -> str:
    return f'--trainer.callbacks+={{"class_path": "tests.helpers.AnnounceBatches", "init_args": {{"sleep": {sleep}}}}}'


def run_env() -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=run_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def run_and_sigterm(cmd: list[str], cwd: Path, after_batches: int) -> int:
    """Start ``cmd``, send SIGTERM once it reports ``after_batches`` training batches; return its exit status."""
    with open(cwd / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=run_env(), stdout=subprocess.PIPE, stderr=err, text=True)
        for line in proc.stdout:
            if line.strip() == f"BATCH {after_batches}":
                proc.send_signal(signal.SIGTERM)
                break
        proc.stdout.read()
        return proc.wait(timeout=600)


def read_log(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def assert_same_rows(resumed: list[dict[str, float]], full: list[dict[str, float]]) -> None:
    assert [sorted(r) for r in resumed] == [sorted(r) for r in full]
    for i, (a, b) in enumerate(zip(resumed, full, strict=True)):
        for key in b:
            assert a[key] == pytest.approx(b[key], abs=1e-6, rel=0, nan_ok=True), (i, key)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_sigterm_and_resume_with_the_shipped_config_equals_the_uninterrupted_run(quickstart_layout, tmp_path, stage):
    full = workdir(quickstart_layout, tmp_path / "full")
    part = workdir(quickstart_layout, tmp_path / "part")
    out = Path("runs") / "quickstart" / stage
    run(command(stage), full)

    _, after, total, start = STAGES[stage]
    status = run_and_sigterm(command(stage, announce(1.0)), part, after)
    assert status == EXIT_PREEMPTED, (part / "stderr.txt").read_text()[-4000:]
    ckpt = torch.load(part / out / "checkpoints" / "last.ckpt", weights_only=True)
    done = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
    assert after <= done < total, "stopped mid-run"
    before = read_log(part / out / "logs" / "metrics.csv")
    assert before, "the interrupted run logged rows"

    run(command(stage, "--ckpt_path", "last"), part)
    full_log, resumed_log = read_log(full / out / "logs" / "metrics.csv"), read_log(part / out / "logs" / "metrics.csv")
    assert resumed_log[: len(before)] == before, "rows logged before the interruption are kept"
    assert_same_rows(resumed_log, full_log)
    final_full = load_file(full / out / "export" / "model.safetensors")
    final_resumed = load_file(part / out / "export" / "model.safetensors")
    initial = load_file(quickstart_layout / "runs" / "quickstart" / start / "model.safetensors")
    assert any(not torch.equal(final_full[k], initial[k]) for k in initial if k in final_full), "weights trained"
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], atol=1e-6, rtol=0, msg=key)
