"""Iterated RLHF: ranking tasks (sample, judge, human rankings read back) and the round loop, offline on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lit_rlhf.datamodules import PreferenceDataModule
from lit_rlhf.errors import DataError
from lit_rlhf.iterate import Evaluation, Judge, Stage, iterate, output_overrides, relocate, rm_gold_gap
from lit_rlhf.labelling import (
    label_ranking_task,
    ranking_from_scores,
    read_rankings,
    write_jsonl,
    write_ranking_task,
)
from lit_rlhf.quickstart.task import write_quickstart_data

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The movie was", "This phone was", "Overall, the book was"]


def length_judge(prompts: list[str], responses: list[str]) -> list[float]:
    """A judge with (almost) no ties on random text: longer is better."""
    return [float(len(r)) for r in responses]


@pytest.fixture(scope="module")
def task_file(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("task") / "task.jsonl"
    return write_ranking_task(str(tiny_model_dir), PROMPTS, str(out), k=3, max_new_tokens=8, seed=3)


def test_ranking_task_has_k_responses_an_empty_ranking_and_the_sampling_settings(task_file, tiny_model_dir):
    rows = [json.loads(line) for line in task_file.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS  # a random model's 3 samples are distinct
    for row in rows:
        assert len(row["responses"]) == 3 and row["ranking"] == []
        assert row["sampling"] == {
            "policy": str(tiny_model_dir), "seed": 3, "temperature": 1.0, "max_new_tokens": 8, "k": 3
        }  # fmt: skip
    again = write_ranking_task(str(tiny_model_dir), PROMPTS, str(task_file.with_name("again.jsonl")), k=3,
                               max_new_tokens=8, seed=3)  # fmt: skip
    assert again.read_text() == task_file.read_text()  # seeded


@pytest.mark.parametrize("judge", ["reward_fn", "reward_model"])
def test_task_ranked_by_a_judge_reads_back_as_k_wise_data(task_file, tiny_model_dir, judge, tmp_path):
    kwargs = {"reward_fn": length_judge} if judge == "reward_fn" else {"reward_model": str(tiny_model_dir)}
    labelled = label_ranking_task(str(task_file), str(tmp_path / "ranked.jsonl"), **kwargs)
    rows = read_rankings(str(labelled))
    if judge == "reward_fn":
        for row in rows:
            lengths = [len(row["responses"][i]) for i in row["ranking"] if isinstance(i, int)]
            assert lengths == sorted(lengths, reverse=True)
    data = PreferenceDataModule(str(labelled), tokenizer=str(tiny_model_dir), max_length=64, batch_size=3)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["ranks"].shape == (3, 3) and batch["input_ids"].shape[0] == 9  # K-wise, 3 prompts x K = 3


def test_gold_judge_ranks_by_sentiment_with_ties_grouped(tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", [
        {"prompt": "The movie was", "responses": [" plain.", " awful.", " wonderful.", " average."], "ranking": []}
    ])  # fmt: skip
    labelled = label_ranking_task(
        str(task), str(tmp_path / "ranked.jsonl"), reward_fn="lit_rlhf.quickstart.task:gold_scores"
    )
    (row,) = read_rankings(str(labelled))
    assert row["ranking"] == [2, [0, 3], 1] and row["judge"] == "lit_rlhf.quickstart.task:gold_scores"


def test_ranking_from_scores():
    assert ranking_from_scores([0.1, 0.9, 0.1, -1.0]) == [1, [0, 2], 3]


@pytest.mark.parametrize(
    ("ranking", "message"),
    [
        ([0, 1], "ranks 2 responses but there are 3"),
        ([0, 1, 5], "index 5, out of range for 3 responses"),
        ([0, [1, 1]], "lists response 1 twice"),
        ([], "not ranked yet"),
        ("0 1 2", "must be a list of response indices"),
    ],
)
def test_malformed_human_rankings_name_the_file_and_line(tmp_path, ranking, message):
    good = {"prompt": "The movie was", "responses": [" good.", " bad.", " fine."], "ranking": [0, 2, 1]}
    path = write_jsonl(tmp_path / "human.jsonl", [good, {**good, "ranking": ranking}])
    with pytest.raises(DataError, match=rf"human\.jsonl:2: .*{message}"):
        read_rankings(str(path))


def test_relocate_moves_only_the_stage_outputs(tmp_path):
    overrides = output_overrides(Stage(str(ROOT / "configs/quickstart/rm.yaml"), "runs/quickstart/rm"), tmp_path / "rm")
    # the shipped config names its outputs through default_root_dir alone; its inputs stay where they are
    assert overrides == {"trainer": {"default_root_dir": str(tmp_path / "rm")}}
    assert "runs/quickstart/data" not in yaml.safe_dump(overrides)
    assert relocate(["runs/a/rm", "runs/a/rmx", "runs/a/rm/x"], "runs/a/rm", "r2") == ["r2", "runs/a/rmx", "r2/x"]


def test_rm_gold_gap_measures_reward_the_gold_judge_does_not_grant():
    # on SFT samples gold = rm / 10; the policy's RM score promises gold 0.8 but the gold judge gives 0.5
    rows = [
        {"baseline_rm_score": x, "baseline_fn_score": x / 10, "policy_rm_score": 8.0, "policy_fn_score": 0.5}
        for x in (-5.0, 0.0, 5.0)
    ]
    gap = rm_gold_gap(rows)
    assert gap["rm_as_gold"] == pytest.approx(0.8) and gap["rm_gold_gap"] == pytest.approx(0.3)


TINY_RM = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--data.init_args.batch_size=4"]
TINY_PPO = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_val_batches=0",
    "--data.init_args.batch_size=4",
    "--model.init_args.sampling.max_new_tokens=8",
    "--model.init_args.ppo.ppo_epochs=1",
    "--model.init_args.ppo.num_mini_batches=1",
    "--model.init_args.ppo.micro_batch_size=4",
]


@pytest.mark.timeout(600)
def test_two_round_loop_retrains_on_all_comparisons_and_keeps_the_sft_reference(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)  # the stage configs read their inputs under runs/quickstart/data
    data = write_quickstart_data("runs/quickstart/data", n_sft_train=16, n_sft_val=4, n_rank_train=8, n_rank_val=4,
                                 n_prompts_train=8, n_prompts_eval=2)  # fmt: skip
    summaries = iterate(
        sft=str(tiny_model_dir),
        prompts=str(data["prompts_train"]),
        rm=Stage(str(ROOT / "configs/quickstart/rm.yaml"), "runs/quickstart/rm", TINY_RM),
        ppo=Stage(str(ROOT / "configs/quickstart/ppo.yaml"), "runs/quickstart/ppo", TINY_PPO),
        judge=Judge(reward_model=str(tiny_model_dir)),  # a random scalar head: no ties on random text
        evaluation=Evaluation(str(data["prompts_eval"]), "lit_rlhf.quickstart.task:gold_scores", num_samples=1),
        run_dir="runs/iterate",
        rounds=2,
        k=3,
        prompts_per_round=4,
        max_new_tokens=8,
    )
    run = tmp_path / "runs" / "iterate"
    assert [s["round"] for s in summaries] == [1, 2]
    # no initial comparisons: round 1 ranked 4 prompts sampled from SFT, round 2 4 from the round-1 policy
    round_1 = (run / "round_1" / "comparisons.jsonl").read_text().splitlines()
    round_2 = (run / "round_2" / "comparisons.jsonl").read_text().splitlines()
    assert len(round_1) == 4 and len(round_2) == 8 and round_2[:4] == round_1  # the round-2 RM saw round 1's
    assert json.loads(round_2[4])["sampling"]["policy"] == "runs/iterate/round_1/ppo/export"
    rm_2 = yaml.safe_load((run / "round_2" / "rm" / "logs" / "config.yaml").read_text())
    assert rm_2["data"]["init_args"]["train_data"] == "runs/iterate/round_2/comparisons.jsonl"
    ppo_2 = yaml.safe_load((run / "round_2" / "ppo" / "logs" / "config.yaml").read_text())["model"]["init_args"]
    assert ppo_2["reference"]["name_or_path"] == str(tiny_model_dir)  # the original SFT model
    assert ppo_2["policy"]["name_or_path"] == "runs/iterate/round_1/ppo/export"
    assert ppo_2["critic"]["name_or_path"] == "runs/iterate/round_1/ppo/critic"
    assert ppo_2["reward_model"]["name_or_path"] == "runs/iterate/round_2/rm/export"
    for r in (1, 2):
        for export in ("rm/export", "ppo/export", "ppo/critic"):
            assert (run / f"round_{r}" / export / "config.json").exists(), (r, export)
    assert {"fn_score", "rm_gold_gap", "kl_to_reference"} <= set(summaries[1])
    assert (run / "report" / "rounds.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 2 | 8 |" in (run / "report" / "report.md").read_text()


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "iterate").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_iterate_configs_parse_and_name_existing_stage_configs(config, capsys):
    from lit_rlhf.iterate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for stage in ("rm", "ppo"):
        stage_config = yaml.safe_load((ROOT / printed[stage]["config"]).read_text())
        assert printed[stage]["outputs"] in yaml.safe_dump(stage_config)  # the outputs folder it moves exists
