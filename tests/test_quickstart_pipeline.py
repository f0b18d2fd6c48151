"""The main job end to end: a shortened quickstart (SFT -> RM -> PPO -> evaluation -> report), offline."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lit_rlhf.quickstart.report import TARGETS, check_targets

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_smoke_quickstart_runs_every_stage_and_writes_the_report(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    out = subprocess.run(
        [sys.executable, "-m", "lit_rlhf.quickstart", "--smoke"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart"
    for stage in ("sft", "rm", "ppo"):
        assert (run / stage / "export" / "config.json").exists(), stage
        assert (run / stage / "checkpoints" / "last.ckpt").exists(), stage
        assert f"[quickstart] {stage}: " in out.stdout
    summary = json.loads((run / "report" / "summary.json").read_text())
    for key in ("fn_score", "baseline/fn_score", "rm_score", "kl_to_reference", "win_rate/fn_score", "eos_rate"):
        assert key in summary
    assert 0.0 <= summary["win_rate/fn_score"] <= 1.0
    assert len((run / "report" / "samples.jsonl").read_text().splitlines()) == 8  # 8 held-out prompts x 1
    report = (run / "report" / "report.md").read_text()
    assert "| RM held-out pairwise accuracy vs the gold order >= 0.85 |" in report
    assert "| words never in the demonstrations (degenerate text) |" in report
    for png in ("sft.png", "rm.png", "ppo.png"):
        assert (run / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stdout.count("[quickstart] PASS") + out.stdout.count("[quickstart] MISS") == len(TARGETS)


def test_targets_are_checked_in_the_right_direction():
    rows = {
        label: ok
        for label, _, ok in check_targets(
            {"rm_accuracy": 0.85, "gold_gain": 0.29, "gold_win_rate": 0.9, "kl": 10.5, "unknown_word_gap": 0.006}
        )
    }
    assert list(rows.values()) == [True, False, True, False, False]
    assert [ok for _, _, ok in check_targets({"unknown_word_gap": 0.005})] == [True]


def test_the_engine_flag_reaches_the_sampling_stages_only():
    """``--engine vllm``: PPO and the compared methods sample from vLLM (the stage's engine override, after the
    smoke overrides); SFT, RM and DPO run unchanged; without vLLM installed the command stops in one line before
    any stage runs."""
    from lit_rlhf.hf.vllm_engine import installed_vllm_version
    from lit_rlhf.quickstart.__main__ import SAMPLING_STAGES, SMOKE_OVERRIDES, main, stage_overrides

    vllm = ["--model.init_args.engine=lit_rlhf.hf.vllm_engine.VLLMEngine"]
    args = argparse.Namespace(engine="vllm", smoke=True)
    for stage in ("ppo", "grpo", "rloo", "gspo", "dapo"):
        assert stage in SAMPLING_STAGES
        assert stage_overrides(stage, args) == [*SMOKE_OVERRIDES[stage], *vllm]
    for stage in ("sft", "rm", "dpo"):
        assert stage_overrides(stage, args) == SMOKE_OVERRIDES[stage]
    assert stage_overrides("ppo", argparse.Namespace(engine="hf", smoke=False)) == []
    if installed_vllm_version() is None:  # the main venv; .venv-vllm runs the engine itself (tests/vllm)
        with pytest.raises(ImportError, match="VLLMEngine needs vLLM"):
            main(["--engine", "vllm", "--prepare-only"])
