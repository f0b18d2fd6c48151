"""Shared-base PPO and GRPO (one base, LoRA adapters per role: lit_rlhf.hf.shared_base) under FSDP2 on 2 CPU
processes (gloo) against 1 process with twice the batch, as in tests/sharded/test_fsdp2.py.

The adapter roles (critic, reward model) run the base's decoder through a method of the FSDP2 root registered
with FSDP2 (``SharedBase.on_sharded``), so the root's weights (embeddings, final norm) are gathered around it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.sharded.stages import MAX_GRAD_NORM, fit, module_and_data, role_states
from tests.sharded.test_fsdp2 import assert_same_weights, launch_stages, wait

pytestmark = pytest.mark.usefixtures("one_multiprocess_test_at_a_time")


@pytest.fixture
def paths(tiny_model_dir, rm_adapter_dir, tiny_tokenizer, tmp_path) -> dict[str, str]:
    from lit_rlhf.hf import LoraSpec, ModelSpec
    from lit_rlhf.hf.scoring import set_reward_normalization
    from lit_rlhf.models.reward import RewardModule
    from lit_rlhf.quickstart.assets import build_tiny_llama
    from lit_rlhf.quickstart.task import prompt_examples
    from tests.conftest import write_jsonl
    from tests.helpers import randomize_lora

    # prompts of one token length: no process pads differently from the single one
    rows = prompt_examples(200, seed=1)
    lengths = [len(tiny_tokenizer(r["prompt"])["input_ids"]) for r in rows]
    common = max(set(lengths), key=lengths.count)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [r for r, n in zip(rows, lengths) if n == common][:16])
    # a base whose LM head is its embedding matrix (one weight of the root, gathered by both kinds of forward),
    # with a LoRA reward model trained on it
    tied = build_tiny_llama(tmp_path / "tied", tiny_tokenizer, hidden_size=64, num_layers=2, tie_word_embeddings=True)
    torch.manual_seed(3)
    rm = RewardModule(ModelSpec(str(tied), lora=LoraSpec(r=4, alpha=8)))
    rm.configure_model()
    randomize_lora(rm.model, 0.3, seed=4)
    set_reward_normalization(rm.model, bias=0.3, scale=2.0)
    rm.export_hf(tmp_path / "tied_rm", merge_adapters=False)
    return {
        "model": str(tiny_model_dir),
        "rm_adapter": str(rm_adapter_dir),
        "tied_model": str(tied),
        "tied_rm_adapter": str(tmp_path / "tied_rm"),
        "prompts": str(prompts),
    }


def initial_state(stage: str, paths: dict[str, str]) -> dict[str, torch.Tensor]:
    module, _ = module_and_data(stage, paths, batch_size=8)
    module.configure_model()
    return role_states(module)[0]


def is_trained(key: str) -> bool:
    return ".policy." in key or ".critic." in key or key.startswith("critic.score.")


def assert_same_training(sharded: dict, single: dict, initial: dict, name: str) -> float:
    """Trained weights equal to 1e-5 and moved, frozen ones (base, reward adapter and head) untouched on both
    sides; returns the largest difference of a trained weight."""
    assert sharded.keys() == single.keys() == initial.keys(), name
    trained = [k for k in single if is_trained(k)]
    frozen = [k for k in single if not is_trained(k)]
    assert any(".reward_model." in k for k in frozen) and any("layers.0.mlp" in k for k in frozen), name
    # the policy's lora_B starts at zero, the critic's adapter and head from the reward model's
    moved = [k for k in trained if not torch.equal(single[k], initial[k])]
    assert any(".lora_B.policy." in k for k in moved), name
    if "critic.score.weight" in single:
        assert "critic.score.weight" in moved and any(".critic." in k for k in moved), name
    for key in frozen:
        assert torch.equal(sharded[key], initial[key]) and torch.equal(single[key], initial[key]), f"{name}: {key}"
    for key in trained:
        torch.testing.assert_close(sharded[key], single[key], atol=1e-5, rtol=0, msg=f"{name}: {key}")
    return max(float((sharded[k] - single[k]).abs().max()) for k in trained)


@pytest.mark.timeout(900)
def test_shared_base_ppo_and_grpo_under_fsdp2_equal_one_process_and_sample_uneven_lengths(paths, tmp_path):
    """Shared-base PPO (policy, critic and reward adapters on one sharded base; the critic head a unit of its own,
    the frozen reward head whole), plain and with FSDP2's activation checkpointing (recomputed under the adapter of
    each forward), and shared-base GRPO (no critic) on a base with tied embeddings: 2 processes × 4 prompts equal
    1 process × 8 (2 iterations, 2 clipped SGD-momentum steps each), every adapter and head to 1e-5, the merged
    policy and critic exports and the unmerged critic adapter too; then shared-base PPO sampling where the
    processes stop at different lengths (2 and 6 tokens)."""
    runs = ["ppo_shared", "ppo_shared:checkpointing", "grpo_shared_tied"]
    process = launch_stages(paths, tmp_path / "sharded", [*runs, "ppo_shared_uneven"])
    single = {
        stage: role_states(fit(stage, paths, tmp_path / "single" / stage, batch_size=8))[0]
        for stage in ("ppo_shared", "grpo_shared_tied")
    }
    unclipped = role_states(fit("ppo_shared", paths, tmp_path / "unclipped", batch_size=8, max_grad_norm=None))[0]
    initial = {stage: initial_state(stage, paths) for stage in single}
    wait(process)

    gap = max((unclipped[k] - single["ppo_shared"][k]).abs().max() for k in unclipped)
    assert gap > 1e-3, f"clipping at {MAX_GRAD_NORM} must be active"
    sharded_dir = tmp_path / "sharded"
    for name in runs:
        stage = name.split(":")[0]
        sharded = load_file(sharded_dir / name / "state.safetensors")
        worst = assert_same_training(sharded, single[stage], initial[stage], name)
        print(f"{name}: largest difference of a trained weight {worst:.2e}")
        assert_same_weights(sharded_dir / name / "export", tmp_path / "single" / stage / "export")
    for name in ("ppo_shared", "ppo_shared:checkpointing"):
        assert_same_weights(sharded_dir / name / "critic", tmp_path / "single" / "ppo_shared" / "critic")
        two, one = (side / "critic_adapter" for side in (sharded_dir / name, tmp_path / "single" / "ppo_shared"))
        adapter_two, adapter_one = (load_file(d / "adapter_model.safetensors") for d in (two, one))
        assert adapter_one.keys() == adapter_two.keys() and "base_model.model.score.weight" in adapter_one
        for key in adapter_one:
            torch.testing.assert_close(adapter_two[key], adapter_one[key], atol=1e-5, rtol=0, msg=f"{name}: {key}")
        assert json.loads((two / "reward_normalization.json").read_text()) == json.loads(
            (one / "reward_normalization.json").read_text()
        )
    results = json.loads((sharded_dir / "results.json").read_text())
    assert results["ppo_shared_uneven"] == {"lengths": [[2], [6]], "iteration": 1}
    assert (sharded_dir / "ppo_shared_uneven" / "export" / "model.safetensors").exists()
    assert all(results[name] == {"iteration": 2} for name in runs)
