"""``python -m lit_rlhf`` says how a run ended: exit statuses, one-line errors, no export from a stopped run.

(Pre-emption, status 75, is tested with a real SIGTERM in tests/test_preemption.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_rlhf.errors import EXIT_ERROR, EXIT_KL_STOP, EXIT_NUMERICAL_FAULT, TRACEBACK_ENV
from lit_rlhf.quickstart.task import prompt_examples, ranking_examples
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart"


def lit_rlhf(args: list[str], cwd: Path, module: str = "lit_rlhf", traceback: bool = False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env["PYTHONPATH"] = pythonpath
    env.pop(TRACEBACK_ENV, None)
    if traceback:
        env[TRACEBACK_ENV] = "1"
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def ppo_config(tmp_path: Path, tiny_model_dir: Path, **model_args) -> Path:
    """The quickstart PPO config on tiny inputs, run from ``tmp_path`` (outputs under runs/quickstart/ppo)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_examples(64, seed=1))  # 2 iterations an epoch
    override = {
        "trainer": {"max_epochs": 3, "limit_val_batches": 0, "enable_progress_bar": False},
        "model": {
            "init_args": {
                "policy": {"name_or_path": str(tiny_model_dir)},
                "critic": None,
                "value_head": True,
                "reward_model": None,
                "sampling": {"max_new_tokens": 4},
                "ptx": None,  # these runs test exit statuses, not the PTX term
                **model_args,
            }
        },
        "data": {"init_args": {"train_data": str(prompts), "val_data": None}},
    }
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


@pytest.mark.timeout(600)
def test_a_run_stopped_by_the_numerical_fault_guard_exits_3_without_an_export(tmp_path, tiny_model_dir):
    config = ppo_config(tmp_path, tiny_model_dir, reward={"fn": "tests.helpers:nan_scores"})
    out = lit_rlhf(["fit", "--config", str(QUICKSTART / "ppo.yaml"), "--config", str(config)], tmp_path)
    assert out.returncode == EXIT_NUMERICAL_FAULT, out.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart" / "ppo"
    assert not (run / "export").exists(), "a run stopped by a fault must not look finished"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["ppo_state"]["iteration"] == 3  # stopped after the 3rd consecutive skipped iteration of 6
    assert "reward was NaN/inf" in out.stderr


@pytest.mark.timeout(600)
def test_a_run_stopped_by_the_kl_monitor_exits_4_without_an_export(tmp_path, tiny_model_dir):
    config = ppo_config(tmp_path, tiny_model_dir, reward={"fn": "lit_rlhf.quickstart.task:gold_scores"})
    stop_at_once = json.dumps(
        [
            {"class_path": "lit_rlhf.callbacks.KLMonitor", "init_args": {"warn_above": -2.0, "stop_above": -1.0}},
            {"class_path": "lit_rlhf.callbacks.HFExport", "init_args": {"dirpath": "runs/quickstart/ppo/export"}},
        ]
    )
    args = ["fit", "--config", str(QUICKSTART / "ppo.yaml"), "--config", str(config)]
    out = lit_rlhf([*args, f"--trainer.callbacks={stop_at_once}"], tmp_path)
    assert out.returncode == EXIT_KL_STOP, out.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart" / "ppo"
    assert not (run / "export").exists()
    assert (tmp_path / "runs" / "quickstart" / "ppo" / "kl_stop.ckpt").exists()


def test_bad_data_is_one_line_and_status_2_and_the_traceback_on_request(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    args = ["fit", "--config", str(QUICKSTART / "sft.yaml"), f"--data.init_args.train_data={bad}"]
    out = lit_rlhf(args, tmp_path)
    assert out.returncode == EXIT_ERROR
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: {bad}:2:12: invalid JSON: Expecting value"], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    shown = lit_rlhf(args, tmp_path, traceback=True)
    assert shown.returncode != 0 and "Traceback" in shown.stderr and "DataError" in shown.stderr


def test_missing_file_and_invalid_setting_are_one_line(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    out = lit_rlhf(
        ["fit", "--config", str(QUICKSTART / "sft.yaml"), f"--data.init_args.train_data={missing}"], tmp_path
    )
    assert out.returncode == EXIT_ERROR and f"error: {missing}: no such file" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr

    # a ValueError raised by lit_rlhf's own validation of a setting (here in a callback's constructor)
    monitor = '[{"class_path": "lit_rlhf.callbacks.KLMonitor", "init_args": {"warn_below": 1.0}}]'
    out = lit_rlhf(["fit", "--config", str(QUICKSTART / "ppo.yaml"), f"--trainer.callbacks={monitor}"], tmp_path)
    assert out.returncode == EXIT_ERROR, out.stderr[-3000:]
    assert "warn_below must be <= 0" in out.stderr and "Traceback" not in out.stderr


def test_argument_errors_are_short(tmp_path):
    out = lit_rlhf(["fit", "--config", str(QUICKSTART / "sft.yaml"), "--model.init_args.micro_batch_sise=2"], tmp_path)
    assert out.returncode == EXIT_ERROR
    assert "micro_batch_sise" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 6, out.stderr  # no 50-line usage text
    assert out.stderr.startswith("error: ")


def test_other_entry_points_report_input_errors_in_one_line(tmp_path):
    bad = write_jsonl(tmp_path / "ranked.jsonl", [{**ranking_examples(1, seed=0)[0], "ranking": []}])
    out = lit_rlhf(["check", "--path", str(bad)], tmp_path, module="lit_rlhf.labelling")
    assert out.returncode == EXIT_ERROR, out.stderr[-3000:]
    assert out.stderr.splitlines()[0] == f"error: {bad}:1: not ranked yet (column 'ranking' is empty)"
