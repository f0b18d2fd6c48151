"""The quickstart comparison: the degenerate-text measure, and ``--compare`` end to end on tiny models."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lit_rlhf.quickstart.compare import (
    demonstration_vocabulary,
    keeps_sft_words,
    meets_targets,
    unknown_word_rate,
    words,
)
from lit_rlhf.quickstart.task import write_quickstart_data

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_word_rate_counts_invented_and_broken_words(tmp_path):
    paths = write_quickstart_data(tmp_path, n_sft_train=200, n_sft_val=1, n_rank_train=1, n_rank_val=1)
    vocabulary = demonstration_vocabulary([paths["sft_train"]])
    assert {"the", "minute", "enjoyed", "excellent"} <= vocabulary
    assert words("I didn't enjoy it, ofb!") == ["i", "didn't", "enjoy", "it", "ofb"]
    text = " fantasterfeculeasant, and I enjoyed every minute ofb"  # the PPO sample of issue 15
    assert unknown_word_rate([text], vocabulary) == pytest.approx(2 / 7)
    assert unknown_word_rate([" excellent from start to finish."], vocabulary) == 0.0
    assert unknown_word_rate(["", "!!"], vocabulary) == 0.0


def test_targets_of_the_comparison():
    rl = {"gold_gain": 0.31, "gold_win_rate": 0.7, "kl": 9.9}
    assert meets_targets("grpo", rl) and not meets_targets("grpo", {**rl, "kl": 10.1})
    assert meets_targets("dpo", {"gold_gain": 0.01}) and not meets_targets("dpo", {"gold_gain": -0.01})
    assert keeps_sft_words({"unknown_word_rate": 0.016, "sft_unknown_word_rate": 0.0115})
    assert not keeps_sft_words({"unknown_word_rate": 0.017, "sft_unknown_word_rate": 0.0115})


@pytest.mark.timeout(900)
def test_compare_trains_the_chosen_methods_and_writes_the_table(tmp_path, tiny_model_dir, tiny_classifier_dir):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    run = tmp_path / "runs" / "quickstart"
    write_quickstart_data(run / "data", n_sft_train=64, n_sft_val=8, n_rank_train=8, n_rank_val=8, n_prompts_eval=4)
    shutil.copytree(tiny_model_dir, run / "sft" / "export")
    shutil.copytree(tiny_classifier_dir, run / "rm" / "export")
    cmd = [sys.executable, "-m", "lit_rlhf.quickstart", "--compare", "--stages", "grpo", "--smoke"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no runs/quickstart/ppo/export, ppo left out" in out.stdout
    report = (run / "report" / "compare.md").read_text()
    assert "| | SFT | GRPO |" in report and "unknown-word rate" in report
    assert "| prompts seen / responses sampled | | 4 / 16 |" in report  # 2 iterations x 2 prompts x K=4
    for png in ("compare.png", "grpo.png"):
        assert (run / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (run / "report" / "compare.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["grpo"]
    # `--compare --stages` alone evaluates the exports again without training
    again = subprocess.run([*cmd[:-2], "--smoke"], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0 and "[quickstart] grpo: " not in again.stdout, again.stderr[-3000:]
    assert "PASS grpo" in again.stdout or "MISS grpo" in again.stdout
