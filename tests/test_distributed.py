"""Multi-process behaviour with Lightning's DDP on CPU (gloo), through the real CLI in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "configs" / "quickstart" / "sft.yaml"


@pytest.fixture(autouse=True)
def _one_multiprocess_test_at_a_time():
    """Every test here starts several processes: never two at once under pytest-xdist (tests/sharded/lock.py)."""
    from tests.sharded.lock import multiprocess_lock

    with multiprocess_lock():
        yield


def sft_override(tmp_path: Path, name: str, model_dir: Path, train: Path, batch_size: int, max_steps: int) -> Path:
    run = tmp_path / name
    override = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": max_steps,
            "max_epochs": -1,
            "default_root_dir": str(run),
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True, "save_top_k": 0},
                },
                {"class_path": "lit_rlhf.callbacks.HFExport", "init_args": {"dirpath": str(run / "export")}},
            ],
        },
        "model": {
            "init_args": {
                "model": {"name_or_path": str(model_dir)},
                "max_grad_norm": None,
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}},
            }
        },
        "data": {"init_args": {"train_data": str(train), "val_data": None, "batch_size": batch_size}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "lit_rlhf", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def fit_one_and_two_processes(stage: Path, single: Path, ddp: Path, preset: Path | None = None) -> None:
    """``fit`` the stage config with the ``single`` override in one process, then with the ``ddp`` override in two
    CPU processes: plain ``ddp``, or the strategy of a ``preset`` config (e.g. configs/strategies/ddp.yaml)."""
    cli("fit", "--config", str(stage), "--config", str(single))
    strategy = ["--config", str(preset)] if preset is not None else []
    plain = [] if preset is not None else ["--trainer.strategy=ddp"]
    cli(
        "fit",
        "--config",
        str(stage),
        *strategy,
        "--config",
        str(ddp),
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        *plain,
    )


@pytest.mark.timeout(600)
def test_sft_ddp_two_processes_equals_one_process_with_twice_the_batch(tiny_model_dir, sft_jsonl, tmp_path):
    single = sft_override(tmp_path, "single", tiny_model_dir, sft_jsonl[0], batch_size=8, max_steps=2)
    ddp = sft_override(tmp_path, "ddp", tiny_model_dir, sft_jsonl[0], batch_size=4, max_steps=2)
    fit_one_and_two_processes(SFT, single, ddp)
    one = load_file(tmp_path / "single" / "export" / "model.safetensors")
    two = load_file(tmp_path / "ddp" / "export" / "model.safetensors")
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(one[k], initial[k]) for k in one), "two SGD steps must change the weights"
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=key)

    # a checkpoint written under DDP resumes in a single process and continues the step count
    ckpt = tmp_path / "ddp" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2
    cli("fit", "--config", str(SFT), "--config", str(ddp), "--trainer.max_steps=3", f"--ckpt_path={ckpt}")
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3


def rm_override(tmp_path: Path, name: str, model_dir: Path, rankings: Path, batch_size: int) -> Path:
    run = tmp_path / name
    override = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "max_epochs": -1,
            "default_root_dir": str(run),
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "callbacks": [{"class_path": "lit_rlhf.callbacks.HFExport", "init_args": {"dirpath": str(run / "export")}}],
        },
        "model": {
            "init_args": {
                "model": {"name_or_path": str(model_dir)},
                "max_grad_norm": None,
                "micro_batch_size": None,
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
            }
        },
        "data": {"init_args": {"train_data": str(rankings), "val_data": None, "batch_size": batch_size}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


@pytest.mark.timeout(600)
def test_rm_ddp_two_processes_equals_one_process_with_twice_the_batch(tiny_model_dir, tmp_path):
    from lit_rlhf.quickstart.task import ranking_examples
    from tests.conftest import write_jsonl

    rankings = write_jsonl(tmp_path / "rank.jsonl", ranking_examples(32, seed=3))
    rm = ROOT / "configs" / "quickstart" / "rm.yaml"
    single = rm_override(tmp_path, "single", tiny_model_dir, rankings, 8)
    fit_one_and_two_processes(rm, single, rm_override(tmp_path, "ddp", tiny_model_dir, rankings, 4))
    one = load_file(tmp_path / "single" / "export" / "model.safetensors")
    two = load_file(tmp_path / "ddp" / "export" / "model.safetensors")
    base = load_file(Path(tiny_model_dir) / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(one["model.layers.0.self_attn.q_proj.weight"], base), "two SGD steps must train"
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=key)


def dpo_override(tmp_path: Path, name: str, model_dir: Path, rankings: Path, batch_size: int) -> Path:
    run = tmp_path / name
    override = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "max_epochs": -1,
            "default_root_dir": str(run),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run)}},
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "callbacks": [{"class_path": "lit_rlhf.callbacks.HFExport", "init_args": {"dirpath": str(run / "export")}}],
        },
        "model": {
            "init_args": {
                "policy": {"name_or_path": str(model_dir)},
                "max_grad_norm": None,
                "micro_batch_size": 3,
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
            }
        },
        "data": {"init_args": {"train_data": str(rankings), "val_data": None, "batch_size": batch_size}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


@pytest.mark.timeout(600)
def test_dpo_ddp_two_processes_equals_one_process_with_twice_the_batch(tiny_model_dir, tmp_path):
    """The shipped dpo.yaml (cached reference log-probs, K-wise rankings with ties) through the CLI: 2 processes
    with 4 prompts each equal 1 process with 8, and the export is a plain causal LM."""
    from transformers import AutoModelForCausalLM

    from lit_rlhf.quickstart.task import ranking_examples
    from tests.conftest import write_jsonl

    rankings = write_jsonl(tmp_path / "rank.jsonl", ranking_examples(24, seed=3))
    dpo = ROOT / "configs" / "quickstart" / "dpo.yaml"
    single = dpo_override(tmp_path, "single", tiny_model_dir, rankings, 8)
    fit_one_and_two_processes(dpo, single, dpo_override(tmp_path, "ddp", tiny_model_dir, rankings, 4))
    one = load_file(tmp_path / "single" / "export" / "model.safetensors")
    two = load_file(tmp_path / "ddp" / "export" / "model.safetensors")
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(one[k], base[k]) for k in base), "two SGD steps must train"
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=key)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "export") is not None
    metrics = next((tmp_path / "single").rglob("metrics.csv")).read_text()
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert name in metrics


@pytest.mark.timeout(600)
def test_ppo_fits_two_iterations_under_ddp(tiny_model_dir, tiny_classifier_dir, tmp_path):
    from lit_rlhf.quickstart.task import prompt_examples
    from tests.conftest import write_jsonl

    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_examples(32, seed=1))
    run = tmp_path / "ppo"
    override = {
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "limit_train_batches": 2,
            "default_root_dir": str(run),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run)}},
            "enable_progress_bar": False,
            "limit_val_batches": 0,
            "val_check_interval": 1.0,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True},
                }
            ],
        },
        "model": {
            "init_args": {
                "policy": {"name_or_path": str(tiny_model_dir)},
                "critic": {"name_or_path": str(tiny_classifier_dir)},
                "reward_model": {"name_or_path": str(tiny_classifier_dir)},
                "sampling": {"max_new_tokens": 6},
                "kl": {"coef": 0.1, "target": 6.0, "horizon": 100},
                "ptx": None,  # PTX under DDP has its own test below
            }
        },
        "data": {"init_args": {"train_data": str(prompts), "val_data": None, "batch_size": 8}},
    }
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(override))
    cli(
        "fit",
        "--config",
        str(ROOT / "configs/quickstart/ppo.yaml"),
        "--config",
        str(path),
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
    )
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["ppo_state"]["iteration"] == 2
    assert ckpt["ppo_state"]["kl_controller"]["value"] != 0.1  # the adaptive controller moved, on global KL
    metrics = (next(run.rglob("metrics.csv"))).read_text()
    assert "objective/kl" in metrics


def _whiten_worker(rank: int, port: int, values, mask, out) -> None:
    import torch.distributed as dist

    from lit_rlhf.rlhf import RunningMoments, masked_whiten

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def all_sum(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    rows = slice(0, 3) if rank == 0 else slice(3, 8)
    width = 6 if rank == 0 else 7  # each process pads to its own longest response
    v, m = values[rows, :width], mask[rows, :width]
    moments = RunningMoments()
    moments.update(v[:, 0], all_sum)
    out[rank] = (masked_whiten(v, m, reduce_fn=all_sum).masked_fill(~m, 0), moments.mean.item(), moments.var.item())
    dist.destroy_process_group()


def test_advantage_whitening_and_score_statistics_over_real_gloo_processes():
    import socket

    import torch.multiprocessing as mp

    from lit_rlhf.rlhf import RunningMoments, masked_whiten

    gen = torch.Generator().manual_seed(0)
    values = torch.randn(8, 7, generator=gen, dtype=torch.float64)
    mask = torch.arange(7) < torch.tensor([2, 6, 5, 1, 6, 3, 7, 4])[:, None]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_whiten_worker, args=(port, values, mask, out), nprocs=2, join=True)
    single = masked_whiten(values, mask).masked_fill(~mask, 0)
    combined = torch.cat([torch.nn.functional.pad(out[0][0], (0, 1)), out[1][0]])
    torch.testing.assert_close(combined, single, atol=1e-12, rtol=0)
    moments = RunningMoments()
    moments.update(values[:, 0], lambda t: t)
    for rank in (0, 1):
        assert out[rank][1] == pytest.approx(moments.mean.item()) and out[rank][2] == pytest.approx(moments.var.item())


def ppo_ptx_override(tmp_path: Path, name: str, models: tuple[Path, Path], data: tuple[Path, Path], batch: int) -> Path:
    policy, classifier = models
    prompts, ptx = data
    run = tmp_path / name
    override = {
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 0,
            "default_root_dir": str(run),
            "enable_progress_bar": False,
            "logger": {"class_path": "lit_rlhf.loggers.CSVLogger", "init_args": {"save_dir": str(run), "version": ""}},
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True, "save_top_k": 0},
                },
                {"class_path": "lit_rlhf.callbacks.HFExport", "init_args": {"dirpath": str(run / "export")}},
            ],
        },
        "model": {
            "init_args": {
                "policy": {"name_or_path": str(policy)},
                "critic": {"name_or_path": str(classifier)},
                "reward_model": {"name_or_path": str(classifier)},
                # greedy (top_k 1): the responses do not depend on each process's sampling seed
                "sampling": {"max_new_tokens": 6, "top_k": 1},
                # one minibatch: DDP's global minibatch is then the single process's one
                "ppo": {"ppo_epochs": 2, "num_mini_batches": 1, "micro_batch_size": None},
                "ptx": {"data": str(ptx), "coef": 0.5, "batch_size": 4},
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-3}},
            }
        },
        "data": {"init_args": {"train_data": str(prompts), "val_data": None, "batch_size": batch}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


@pytest.mark.timeout(900)
def test_ppo_ptx_under_the_ddp_preset_equals_one_process_with_twice_the_batch(
    tiny_model_dir, tiny_classifier_dir, tiny_tokenizer, sft_jsonl, tmp_path
):
    import csv

    from lit_rlhf.quickstart.task import prompt_examples
    from tests.conftest import write_jsonl

    # prompts of one token length: no process pads differently from the single one
    rows = prompt_examples(200, seed=1)
    lengths = [len(tiny_tokenizer(r["prompt"])["input_ids"]) for r in rows]
    common = max(set(lengths), key=lengths.count)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [r for r, n in zip(rows, lengths) if n == common][:16])
    models, data = (tiny_model_dir, tiny_classifier_dir), (prompts, sft_jsonl[0])
    ppo = ROOT / "configs" / "quickstart" / "ppo.yaml"
    single = ppo_ptx_override(tmp_path, "single", models, data, batch=8)
    ddp = ppo_ptx_override(tmp_path, "ddp", models, data, batch=4)
    preset = ROOT / "configs" / "strategies" / "ddp.yaml"  # find_unused_parameters: false
    fit_one_and_two_processes(ppo, single, ddp, preset)

    one = load_file(tmp_path / "single" / "export" / "model.safetensors")
    two = load_file(tmp_path / "ddp" / "export" / "model.safetensors")
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(one[k], initial[k]) for k in initial), "four optimizer steps must train the policy"
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=0, msg=key)
    critic_one, critic_two = (
        {
            k: v
            for k, v in torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"].items()
            if k.startswith("critic.")
        }
        for n in ("single", "ddp")
    )
    assert critic_one and critic_one.keys() == critic_two.keys()
    for key in critic_one:
        torch.testing.assert_close(critic_two[key], critic_one[key], atol=2e-5, rtol=0, msg=key)

    def metrics(name: str) -> list[dict[str, float]]:
        with open(tmp_path / name / "logs" / "metrics.csv", newline="") as f:
            keys = ("objective/kl", "objective/score", "ptx/loss")
            return [{k: float(r[k]) for k in keys} for r in csv.DictReader(f) if r.get("objective/kl")]

    assert len(metrics("single")) == len(metrics("ddp")) == 2
    for a, b in zip(metrics("ddp"), metrics("single"), strict=True):
        for key in b:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


@pytest.mark.timeout(900)
def test_grpo_ddp_two_processes_equals_one_process_with_twice_the_batch(tiny_model_dir, tmp_path):
    """Groups stay on their process and the loss normaliser counts the responses of all processes, so two
    processes with 4 prompts each take the steps of one process with 8 (responses made rank-independent by
    ``tests.helpers.DeterministicGroups``; two iterations, two epochs, micro-batches of 4)."""
    from lit_rlhf.quickstart.task import prompt_examples
    from tests.conftest import write_jsonl
    from tests.helpers import trainer_override

    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_examples(32, seed=1))

    def override(name: str, batch_size: int) -> Path:
        run = tmp_path / name
        config = {
            "trainer": trainer_override(run, checkpoint=False, max_epochs=1, limit_train_batches=2),
            "model": {
                "class_path": "tests.helpers.DeterministicGroups",
                "init_args": {
                    "policy": {"name_or_path": str(tiny_model_dir)},
                    "reward_model": None,
                    "reward": {"fn": "tests.helpers:count_e"},
                    "sampling": {"max_new_tokens": 6},
                    "algorithm": {
                        "estimator": "grpo",
                        "group_size": 4,
                        "kl_in": "loss",
                        "loss_aggregation": "sequence_mean",
                        "ppo_epochs": 2,
                        "num_mini_batches": 1,
                        "micro_batch_size": 4,
                    },
                    "kl": {"coef": 0.1},
                    "ptx": None,
                    "max_grad_norm": None,
                    "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
                },
            },
            "data": {"init_args": {"train_data": str(prompts), "val_data": None, "batch_size": batch_size}},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    grpo = ROOT / "configs" / "quickstart" / "grpo.yaml"
    fit_one_and_two_processes(grpo, override("single", 8), override("ddp", 4))
    one = load_file(tmp_path / "single" / "export" / "model.safetensors")
    two = load_file(tmp_path / "ddp" / "export" / "model.safetensors")
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(one[k], initial[k]) for k in one), "four SGD steps must change the weights"
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.timeout(900)
def test_shared_base_ppo_ddp_two_processes_equals_one_process_with_twice_the_batch(
    tiny_model_dir, rm_adapter_dir, tiny_tokenizer, tmp_path
):
    """One base with the policy, critic and reward adapters in each of two DDP processes, 4 prompts each, trains
    the adapters and the value head as one process with 8 prompts does (two iterations, two epochs, one
    minibatch each: 4 AdamW steps)."""
    from lit_rlhf.quickstart.task import prompt_examples
    from tests.conftest import write_jsonl
    from tests.helpers import trainer_override

    # prompts of one token length: no process pads differently from the single one
    rows = prompt_examples(200, seed=1)
    lengths = [len(tiny_tokenizer(r["prompt"])["input_ids"]) for r in rows]
    common = max(set(lengths), key=lengths.count)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [r for r, n in zip(rows, lengths) if n == common][:16])

    def override(name: str, batch_size: int) -> Path:
        run = tmp_path / name
        config = {
            "trainer": trainer_override(run, export=False, max_epochs=1, limit_train_batches=2),
            "model": {
                "init_args": {
                    "policy": {"name_or_path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}},
                    "critic": None,
                    "reward_model": None,
                    "shared_base": {"reward_adapter": str(rm_adapter_dir)},
                    # greedy (top_k 1): the responses do not depend on each process's sampling seed
                    "sampling": {"max_new_tokens": 6, "top_k": 1},
                    # one minibatch: DDP's global minibatch is then the single process's one
                    "ppo": {"ppo_epochs": 2, "num_mini_batches": 1, "micro_batch_size": None},
                    "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-2, "eps": 1.0e-5}},
                    "lr_scheduler": None,
                    "ptx": None,  # the shipped config's PTX data is not in this test's folder
                }
            },
            "data": {"init_args": {"train_data": str(prompts), "val_data": None, "batch_size": batch_size}},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    ppo = ROOT / "configs" / "quickstart" / "ppo.yaml"
    preset = ROOT / "configs" / "strategies" / "ddp.yaml"  # find_unused_parameters: false
    fit_one_and_two_processes(ppo, override("single", 8), override("ddp", 4), preset)

    def trained(name: str) -> dict[str, torch.Tensor]:
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["ppo_state"]["iteration"] == 2
        state = ckpt["state_dict"]
        return {k: v for k, v in state.items() if ".policy." in k or ".critic." in k or k.startswith("critic.score")}

    one, two = trained("single"), trained("ddp")
    assert one.keys() == two.keys()
    assert any(".policy." in k for k in one) and any(".critic." in k for k in one) and "critic.score.weight" in one
    # 4 steps move the policy adapter (its lora_B starts at zero) and the value head (from the reward head)
    policy_b = [k for k in one if ".lora_B.policy." in k]
    assert policy_b and all(one[k].abs().max() > 1e-4 for k in policy_b)
    reward_head = load_file(Path(rm_adapter_dir) / "adapter_model.safetensors")["base_model.model.score.weight"]
    assert (one["critic.score.weight"] - reward_head).abs().max() > 1e-4
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=key)
