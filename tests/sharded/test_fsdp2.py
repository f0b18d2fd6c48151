"""FSDP2 (configs/strategies/fsdp2.yaml, lit_rlhf.hf.sharding) on 2 CPU processes (gloo) against 1 process.

Each test launches tests/sharded/stages.py under torchrun once (runs one after another in one process group)
and, meanwhile, the same stages in this process with twice the batch; the weights (the Hugging Face exports,
gathered from the shards) must agree to 1e-5. Clipping is active in every step (``MAX_GRAD_NORM``), so a
gradient norm taken over one process's shard only would show. A hang fails within ``TIMEOUT_S``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.sharded.stages import TIMEOUT_S, fit

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_multiprocess_test_at_a_time")


@pytest.fixture
def paths(tiny_model_dir, tiny_classifier_dir, tiny_tokenizer, sft_jsonl, tmp_path) -> dict[str, str]:
    from lit_rlhf.quickstart.task import prompt_examples, ranking_examples
    from tests.conftest import write_jsonl

    # prompts of one token length: no process pads differently from the single one
    rows = prompt_examples(200, seed=1)
    lengths = [len(tiny_tokenizer(r["prompt"])["input_ids"]) for r in rows]
    common = max(set(lengths), key=lengths.count)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [r for r, n in zip(rows, lengths) if n == common][:16])
    return {
        "model": str(tiny_model_dir),
        "classifier": str(tiny_classifier_dir),
        "sft": str(sft_jsonl[0]),
        "rankings": str(write_jsonl(tmp_path / "rank.jsonl", ranking_examples(25, seed=3))),
        "prompts": str(prompts),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(*args: str, nnodes: int = 1, node_rank: int = 0, port: int | None = None) -> subprocess.Popen:
    """``torchrun`` (``python -m torch.distributed.run``): 2 processes on one node, or 1 of 2 nodes."""
    if nnodes == 1:
        launch = ["--standalone", "--nproc-per-node", "2"]
    else:
        launch = ["--nnodes", str(nnodes), "--nproc-per-node", "1", "--node-rank", str(node_rank)]
        launch += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    command = [sys.executable, "-m", "torch.distributed.run", *launch, *args]
    return subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=10 * TIMEOUT_S)
    assert process.returncode == 0, output[-4000:]
    return output


def launch_stages(paths: dict[str, str], out: Path, runs: list[str]) -> subprocess.Popen:
    config = out / "config.json"
    out.mkdir(parents=True)
    config.write_text(json.dumps({"paths": paths, "out": str(out), "runs": runs}))
    return torchrun(str(ROOT / "tests" / "sharded" / "stages.py"), str(config))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(sharded: Path, single: Path, initial: Path | None = None, atol: float = 1e-5) -> None:
    two, one = weights(sharded), weights(single)
    assert one.keys() == two.keys(), sharded
    if initial is not None:
        start = weights(initial)
        assert any(not torch.equal(one[k], start[k]) for k in start if k in one), f"{single} did not train"
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=atol, rtol=0, msg=f"{sharded}: {key}")


@pytest.mark.timeout(900)
def test_sft_under_fsdp2_ddp_checkpointing_and_resume_equals_one_process(paths, tmp_path):
    """SFT, 2 processes × 4 examples = 1 process × 8, 2 clipped SGD-momentum steps: FSDP2 (the preset's
    strategy, and Lightning's ModelParallelStrategy set by hand: sharded all the same, not two unsynchronised
    copies), DDP, FSDP2 with activation checkpointing, and FSDP2 stopped after step 1 and resumed from a sharded
    (distributed) and from a one-file checkpoint (the momentum buffers come back with it); FSDP2 with bf16
    mixed precision to 2e-3."""
    runs = ["sft", "sft:model_parallel", "sft:ddp", "sft:checkpointing", "sft:resume_sharded", "sft:resume_full"]
    process = launch_stages(paths, tmp_path / "sharded", [*runs, "sft_samples", "sft:bf16"])
    single = tmp_path / "single"
    fit("sft", paths, single, batch_size=8)
    fit("sft", paths, tmp_path / "unclipped", batch_size=8, max_grad_norm=None)
    output = wait(process)
    # validation samples: every process samples (the sharded weights are gathered in each forward), rank 0 prints
    assert output.count("[sample step 2]") == 2, output[-3000:]
    runs.append("sft_samples")  # sampling leaves the training and its RNG alone

    unclipped, clipped = weights(tmp_path / "unclipped" / "export"), weights(single / "export")
    assert max((unclipped[k] - clipped[k]).abs().max() for k in clipped) > 1e-3, "clipping must be active"
    for name in runs:
        assert_same_weights(tmp_path / "sharded" / name / "export", single / "export", Path(paths["model"]))
    # bf16 compute: the same steps to bf16's precision, in float32 weights
    bf16 = weights(tmp_path / "sharded" / "sft:bf16" / "export")
    assert all(v.dtype == torch.float32 for v in bf16.values())
    assert_same_weights(tmp_path / "sharded" / "sft:bf16" / "export", single / "export", Path(paths["model"]), 2e-3)
    assert any(not torch.equal(bf16[k], clipped[k]) for k in clipped), "bf16 compute must differ from float32"
    results = json.loads((tmp_path / "sharded" / "results.json").read_text())
    assert results["sft:resume_sharded"] == {"sharded_checkpoint": True, "batches_after_resume": 1}
    assert results["sft:resume_full"] == {"sharded_checkpoint": False, "batches_after_resume": 1}


@pytest.mark.timeout(900)
def test_rm_dpo_ppo_grpo_under_fsdp2_equal_one_process_and_sample_uneven_lengths(paths, tmp_path):
    """RM, DPO (its frozen reference copy sharded too, its log-probs cached before training by both processes:
    13 and 12 rankings), DPO with a LoRA policy (reference: its adapter disabled; merged export), PPO with a LoRA
    policy and a value head (sharded as a unit of its own), PPO (policy, critic, reward model, reference: greedy
    sampling with the KV cache on the sharded policy) and GRPO, 2 processes × 4 = 1 process × 8; then PPO (frozen
    roles replicated) and GRPO sampling with ``generate`` where the processes stop at different lengths (2 and 6
    tokens: every process keeps running forwards until all are done, ``synced_gpus``)."""
    stages = ["rm", "dpo", "ppo", "grpo", "dpo_lora", "ppo_value_head"]
    process = launch_stages(paths, tmp_path / "sharded", [*stages, "ppo_uneven", "grpo_uneven"])
    for stage in stages:
        fit(stage, paths, tmp_path / "single" / stage, batch_size=8)
    wait(process)

    for stage in stages:
        initial = None if stage == "rm" else Path(paths["model"])  # the reward model gets a fresh head
        assert_same_weights(tmp_path / "sharded" / stage / "export", tmp_path / "single" / stage / "export", initial)
    assert_same_weights(tmp_path / "sharded" / "ppo" / "critic", tmp_path / "single" / "ppo" / "critic")
    # the RM's normalisation, fitted on 3 reference rows split 2 / 1 over the processes (each runs 2 forwards)
    sharded, single = (
        json.loads((tmp_path / side / "rm" / "export" / "config.json").read_text()) for side in ("sharded", "single")
    )
    assert sharded["reward_bias"] == pytest.approx(single["reward_bias"], abs=1e-5) and single["reward_bias"] != 0
    results = json.loads((tmp_path / "sharded" / "results.json").read_text())
    for name in ("ppo_uneven", "grpo_uneven"):
        assert results[name] == {"lengths": [[2], [6]], "iteration": 1}, name
        assert (tmp_path / "sharded" / name / "export" / "model.safetensors").exists()


@pytest.mark.timeout(900)
def test_two_nodes_through_the_cli_and_the_preset_equal_one_process(paths, tmp_path):
    """2 nodes × 1 process over localhost (torchrun on each "node", Lightning's TorchElastic environment),
    the SFT stage config + configs/strategies/fsdp2.yaml through ``python -m lit_rlhf fit``, equals one process
    with twice the batch."""
    run = tmp_path / "nodes"
    override = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "num_nodes": 2,
            "max_steps": 2,
            "max_epochs": -1,
            "default_root_dir": str(run),
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "callbacks": [{"class_path": "lit_rlhf.callbacks.HFExport", "init_args": {"dirpath": str(run / "export")}}],
            "strategy": {"init_args": {"timeout_s": TIMEOUT_S}},
        },
        "model": {
            "init_args": {
                "model": {"name_or_path": paths["model"]},
                "micro_batch_size": 2,
                "num_val_samples": 0,
                "max_grad_norm": 0.05,
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5, "momentum": 0.9}},
                "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.ConstantLR", "init_args": {"factor": 1.0}},
            }
        },
        "data": {"init_args": {"train_data": paths["sft"], "val_data": None, "batch_size": 4, "max_length": 64}},
    }
    config = tmp_path / "override.yaml"
    config.write_text(yaml.safe_dump(override))
    stage, preset = ROOT / "configs/quickstart/sft.yaml", ROOT / "configs/strategies/fsdp2.yaml"
    port = free_port()
    args = ["-m", "lit_rlhf", "fit", "--config", str(stage), "--config", str(preset), "--config", str(config)]
    nodes = [torchrun(*args, nnodes=2, node_rank=rank, port=port) for rank in (0, 1)]
    fit("sft", paths, tmp_path / "single", batch_size=8)
    for node in nodes:
        wait(node)
    assert_same_weights(run / "export", tmp_path / "single" / "export", Path(paths["model"]))
