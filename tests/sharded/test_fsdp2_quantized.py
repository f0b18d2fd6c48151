"""4-bit and 8-bit roles under FSDP2 (2 CPU processes, gloo): the bitsandbytes weights stay whole and frozen on
every process, everything else is sharded, and the run equals one process with twice the batch.

QLoRA SFT and PPO with a QLoRA policy (reference: its adapter disabled) and a QLoRA critic beside an 8-bit
reward model (sharded too: its embeddings and head), each also stopped after its first step (iteration) and
resumed from its distributed checkpoint (which holds the quantized weights and the 8-bit scales too), PPO also
from a one-file checkpoint; and PPO on one 4-bit shared base (policy, critic and reward adapters). Compared:
each run's weights, quantized ones included (packed 4-bit bytes and quantization state, int8 and scales),
gathered to rank 0 (tests/sharded/stages.py ``quantized_run``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.sharded.stages import fit, module_and_data, role_states
from tests.sharded.test_fsdp2 import launch_stages, paths, wait  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_multiprocess_test_at_a_time")


@pytest.fixture
def quantized_paths(paths, rm_adapter_dir) -> dict[str, str]:  # noqa: F811
    return {**paths, "rm_adapter": str(rm_adapter_dir)}


def initial_states(stage: str, where: dict[str, str]) -> dict[str, torch.Tensor]:
    """The weights of ``stage``'s roles as built (before any step): what a frozen weight must still be."""
    module, _ = module_and_data(stage, where, batch_size=8)
    module.configure_model()
    return role_states(module)[0]


@pytest.mark.timeout(600)
def test_qlora_sft_ppo_8bit_reward_model_and_4bit_shared_base_under_fsdp2_equal_one_process_and_resume(
    quantized_paths, tmp_path
):
    """2 processes × 4 examples = 1 process × 8, 2 clipped SGD-momentum steps (PPO: 2 iterations): the trained
    weights (LoRA adapters, the critic's head) to 1e-5, the quantized and other frozen weights bitwise equal to
    one process's and to the built ones; the resumed runs ran only their second step (iteration) and equal the
    straight ones to 1e-6."""
    where = quantized_paths
    stages = ["sft_qlora", "ppo_qlora", "ppo_shared_qlora"]
    resumed = ["sft_qlora:resume_sharded", "ppo_qlora:resume_sharded", "ppo_qlora:resume_full"]
    runs = ["sft_qlora", "ppo_qlora", "ppo_shared_qlora", *resumed]
    process = launch_stages(where, tmp_path / "sharded", runs)
    single, initial = {}, {}
    for stage in stages:
        single[stage] = role_states(fit(stage, where, tmp_path / "single" / stage, batch_size=8))[0]
        initial[stage] = initial_states(stage, where)
    output = wait(process)

    results = json.loads((tmp_path / "sharded" / "results.json").read_text())
    for name in runs:
        stage = name.split(":")[0]
        got = results[name]
        # every process: 2 layers x 7 linears per quantized model, all whole; the adapters and heads sharded
        count = {"sft_qlora": 14, "ppo_qlora": 3 * 14, "ppo_shared_qlora": 14}[stage]
        assert got["quantized_whole"] == [[count, True, True]] * 2, name
        two, one, start = load_file(tmp_path / "sharded" / name / "state.safetensors"), single[stage], initial[stage]
        assert two.keys() == one.keys() == start.keys(), name
        trained = set(got["trainable"])
        assert trained and all(k.split(".")[0] in ("model", "policy", "critic") for k in trained), name
        for key in one:
            if key in trained:
                torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=f"{name}: {key}")
            else:  # frozen: quantized bytes, their state, embeddings, norms, the reward model
                assert torch.equal(two[key], one[key]) and torch.equal(one[key], start[key]), f"{name}: {key}"
        # the adapters' B start at zero (A is drawn at random)
        assert any(not torch.equal(one[k], start[k]) for k in trained if "lora_B" in k), f"{stage} did not train"
    for name in resumed:  # only the second step (iteration) ran after the resume
        stage, folder = name.split(":")[0], tmp_path / "sharded" / name
        assert results[name]["batches"] == 1 and (folder / "last.ckpt").is_dir() == name.endswith("sharded")
        straight = load_file(tmp_path / "sharded" / stage / "state.safetensors")
        for key, value in load_file(folder / "state.safetensors").items():
            torch.testing.assert_close(value, straight[key], atol=1e-6, rtol=0, msg=f"{name}: {key}")
    assert "Traceback" not in output
