"""PPO and GRPO under FSDP2 (2 CPU processes) killed after one iteration with a distributed checkpoint and resumed:
the same second iteration and the same weights as the run that was never interrupted, and as one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.sharded.stages import fit
from tests.sharded.test_fsdp2 import assert_same_weights, launch_stages, paths, wait  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_multiprocess_test_at_a_time")


@pytest.mark.timeout(900)
def test_ppo_and_grpo_resumed_from_a_sharded_checkpoint_equal_the_uninterrupted_run(paths, tmp_path):  # noqa: F811
    """PPO (policy, critic, reward model, reference: four sharded roles, two optimizers), GRPO, and GRPO sampling
    with each process's own seeds: killed as iteration 2 starts,
    with the distributed checkpoint of iteration 1 (each process writes its shards and the optimizers' momentum),
    a new fit from it runs iteration 2 only; its statistics and the exported policy (and PPO's critic) equal the
    sharded run that went straight through, and (PPO and GRPO, whose responses do not depend on the process's seed)
    one process with twice the batch."""
    runs = ["ppo", "ppo:resume_sharded", "grpo", "grpo:resume_sharded", "grpo_sampled", "grpo_sampled:resume_sharded"]
    process = launch_stages(paths, tmp_path / "sharded", runs)
    for stage in ("ppo", "grpo"):
        fit(stage, paths, tmp_path / "single" / stage, batch_size=8)
    wait(process)

    results = json.loads((tmp_path / "sharded" / "results.json").read_text())
    model = Path(paths["model"])
    for stage in ("ppo", "grpo"):
        resumed, straight = tmp_path / "sharded" / f"{stage}:resume_sharded", tmp_path / "sharded" / stage
        got = results[f"{stage}:resume_sharded"]
        assert got["sharded_checkpoint"] and got["iterations"] == [1, 2] and got["batches_after_resume"] == 1
        assert got["logged"] == results[stage]["logged"] and len(got["logged"]) == 2
        assert_same_weights(resumed / "export", straight / "export", model, atol=1e-6)
        assert_same_weights(resumed / "export", tmp_path / "single" / stage / "export", model)
    assert_same_weights(tmp_path / "sharded" / "ppo:resume_sharded" / "critic", tmp_path / "sharded" / "ppo" / "critic")
    # sampled GRPO: each process draws its own responses with seeds of (rank, iteration), restored on resume
    got = results["grpo_sampled:resume_sharded"]
    assert got["iterations"] == [1, 2] and got["logged"] == results["grpo_sampled"]["logged"]
    resumed, straight = tmp_path / "sharded" / "grpo_sampled:resume_sharded", tmp_path / "sharded" / "grpo_sampled"
    assert_same_weights(resumed / "export", straight / "export", model, atol=1e-6)
