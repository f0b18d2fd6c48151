"""The quickstart comparison: the degenerate-text measure, and ``--compare`` end to end on tiny models."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lit_rlhf.quickstart import __main__ as quickstart
from lit_rlhf.quickstart.compare import (
    Budget,
    demonstration_vocabulary,
    keeps_sft_words,
    meets_targets,
    read_budget,
    unknown_word_rate,
    words,
    write_comparison_report,
    write_results_csv,
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


def test_compare_runs_gspo_and_dapo_beside_the_others(monkeypatch):
    monkeypatch.setattr(quickstart, "CONFIG_DIR", ROOT / "configs" / "quickstart")
    assert quickstart.compare_methods() == ["ppo", "grpo", "rloo", "gspo", "dapo", "dpo"]
    assert {"gspo", "dapo"} <= set(quickstart.ALL_STAGES) & set(quickstart.SMOKE_OVERRIDES)
    assert {"gspo", "dapo"} <= set(quickstart.SUMMARY_METRICS)


@pytest.mark.parametrize(("method", "algorithm"), [("gspo", "GSPO"), ("dapo", "DAPO")])
def test_gspo_and_dapo_stages_are_the_grpo_stage_with_their_algorithm(method, algorithm):
    import yaml

    configs = ROOT / "configs" / "quickstart"
    grpo, other = (yaml.safe_load((configs / f"{m}.yaml").read_text()) for m in ("grpo", method))
    assert other["model"]["init_args"]["algorithm"]["class_path"] == f"lit_rlhf.rlhf.algorithms.{algorithm}"
    assert other["trainer"]["default_root_dir"] == f"runs/quickstart/{method}"
    for name in ("policy", "reward_model", "sampling", "reward", "lr_scheduler"):  # the same stage but the
        assert other["model"]["init_args"][name] == grpo["model"]["init_args"][name], name  # algorithm (and the
    assert other["model"]["init_args"]["ptx"]["data"] == grpo["model"]["init_args"]["ptx"]["data"]  # tuned PTX, lr)
    assert other["data"] == grpo["data"]  # prompts, reward model, budget
    assert other["trainer"]["limit_train_batches"] == grpo["trainer"]["limit_train_batches"]
    update = {k: grpo["model"]["init_args"]["algorithm"][k] for k in ("ppo_epochs", "num_mini_batches")}
    assert {k: other["model"]["init_args"]["update"][k] for k in update} == update


def test_the_report_lists_gspo_and_dapo_like_the_others(tmp_path):
    methods = ["ppo", "grpo", "rloo", "gspo", "dapo", "dpo"]
    results = {
        m: {
            "gold": 0.4 + i / 100,
            "sft_gold": 0.014,
            "gold_gain": 0.386 + i / 100,
            "gold_win_rate": 0.72,
            "rm": 4.0,
            "kl": 0.7 + i,
            "length": 15.0,
            "eos_rate": 1.0,
            "unknown_word_rate": 0.012,
            "sft_unknown_word_rate": 0.0115,
        }
        for i, m in enumerate(methods)
    }
    budgets = {m: Budget(32, 256 if m != "ppo" else 1024, 1024, 128, 24.0) for m in methods}
    row = {"prompt": "The film", "policy_fn_score": 0.6}
    samples = {m: [{**row, "policy_response": f" {m} was great."}] for m in methods}
    report = write_comparison_report(tmp_path, results, budgets, samples, "test machine", {"sft": 25.0}).read_text()
    assert "| | SFT | PPO | GRPO | RLOO | GSPO | DAPO | DPO |" in report
    assert "| KL to SFT (nats / response) | 0 | 0.70 | 1.70 | 2.70 | 3.70 | 4.70 | 5.70 |" in report
    assert "GSPO: met" in report and "DAPO: met" in report and "DAPO: yes" in report
    assert "| GSPO | The film |  gspo was great. |" in report and "| DAPO | The film |  dapo was great. |" in report
    for png in ("compare.png", "gspo.png", "dapo.png"):
        assert f"![{png[:-4]}]({png})" in report
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_results_csv(tmp_path / "compare.csv", results, budgets)
    rows = (tmp_path / "compare.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == methods


def test_budget_of_an_algorithm_given_by_class_path(tmp_path):
    import torch
    import yaml

    (tmp_path / "gspo" / "checkpoints").mkdir(parents=True)
    loops = {"fit_loop": {"epoch_loop.batch_progress": {"total": {"completed": 32}}}}
    torch.save({"loops": loops, "global_step": 128}, tmp_path / "gspo" / "checkpoints" / "last.ckpt")
    config = yaml.safe_load((ROOT / "configs" / "quickstart" / "gspo.yaml").read_text())
    (tmp_path / "gspo" / "logs").mkdir()
    (tmp_path / "gspo" / "logs" / "config.yaml").write_text(yaml.safe_dump(config))
    budget = read_budget("gspo", tmp_path, ROOT / "configs" / "quickstart", 20.0)
    assert budget == Budget(batches=32, prompts=256, samples=1024, optimizer_steps=128, seconds=20.0)


@pytest.mark.timeout(900)
def test_compare_trains_the_chosen_methods_and_writes_the_table(tmp_path, tiny_model_dir, tiny_classifier_dir):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    run = tmp_path / "runs" / "quickstart"
    write_quickstart_data(run / "data", n_sft_train=64, n_sft_val=8, n_rank_train=8, n_rank_val=8, n_prompts_eval=4)
    shutil.copytree(tiny_model_dir, run / "sft" / "export")
    shutil.copytree(tiny_classifier_dir, run / "rm" / "export")
    cmd = [sys.executable, "-m", "lit_rlhf.quickstart", "--compare", "--stages", "grpo", "gspo", "dapo", "--smoke"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no runs/quickstart/ppo/export, ppo left out" in out.stdout
    report = (run / "report" / "compare.md").read_text()
    assert "| | SFT | GRPO | GSPO | DAPO |" in report and "unknown-word rate" in report
    # 2 iterations x 2 prompts x K=4, from the estimator form (GRPO) and from class_path + init_args
    assert "| prompts seen / responses sampled | | 4 / 16 | 4 / 16 | 4 / 16 |" in report
    for png in ("compare.png", "grpo.png", "gspo.png", "dapo.png"):
        assert (run / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (run / "report" / "compare.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["grpo", "gspo", "dapo"]
    # `--compare --stages` alone evaluates the exports again without training
    again = subprocess.run([*cmd[: cmd.index("--stages") + 1], "--smoke"], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0 and "[quickstart] grpo: " not in again.stdout, again.stderr[-3000:]
    for method in ("grpo", "gspo", "dapo"):
        assert f"PASS {method}" in again.stdout or f"MISS {method}" in again.stdout
