"""PPO and GRPO sample from VLLMEngine through the real modules and Trainer: after one update and its sync the
engine's log-probs are those of the *updated* policy, not of the policy before the update, for full weights, a
LoRA adapter and a shared base (whose policy adapter alone goes to the engine). A LoRA sync that copies nothing
is caught by the stale-weights guard."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_rlhf.datamodules.prompts import PromptDataModule
from lit_rlhf.hf import LoraSpec, ModelSpec
from lit_rlhf.models import CriticFreeConfig, CriticFreeModule
from lit_rlhf.models.ppo import PPOConfig, PPOModule, RewardConfig, SamplingConfig, SharedBaseConfig
from tests.helpers import cpu_trainer
from tests.vllm.conftest import max_gap, teacher_forced

pytest.importorskip("vllm", reason="vLLM is not installed (tests/vllm run in the vLLM venv: make test)")

from lit_rlhf.hf.vllm_engine import VLLMEngine  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4  # fp32 engine vs fp32 trainer (measured ~1e-6)
LORA = LoraSpec(r=4, alpha=8)


class EngineAfterUpdate(L.Callback):
    """At the start: a frozen copy of the policy (the weights before the update). After the iteration (update and
    sync done): the engine samples the batch's prompts, and its log-probs are compared with the updated policy's
    and the old copy's teacher-forced ones."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.result: dict = {}

    def on_train_start(self, trainer, module) -> None:
        self.old = copy.deepcopy(module.policy).requires_grad_(False)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        engine, tok = module.engine, module.tokenizer
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        out = engine.generate(ids, mask, module.sampling, seed=123)
        args = (ids, mask, out.responses, self.temperature, tok.pad_token_id, tok.eos_token_id)
        new, resp = teacher_forced(module.policy, *args)
        old, _ = teacher_forced(self.old, *args)
        self.result = {
            "new": max_gap(out.logprobs, new, resp),
            "old": max_gap(out.logprobs, old, resp),
            "syncs": engine.syncs,
            "sync_seconds": engine.last_sync_seconds,
            "lora": engine._lora is not None,
        }


def fit_one_iteration(module, prompts, temperature: float) -> dict:
    probe = EngineAfterUpdate(temperature)
    trainer = cpu_trainer(max_steps=1, callbacks=[probe])
    trainer.fit(module, datamodule=PromptDataModule(str(prompts), batch_size=4))
    assert not module.engine.is_bound  # closed at teardown
    # what the module logged: the rollout's engine-vs-trainer gap (the same weights: ~1e-6) and the sync time
    metrics = trainer.callback_metrics
    assert 0 < metrics["rollout/engine_logprob_gap_max"] < TOLERANCE
    assert metrics["rollout/engine_logprob_gap_mean"] <= metrics["rollout/engine_logprob_gap_max"]
    assert metrics["rollout/engine_sync_s"] > 0 and metrics["rollout/engine_sync_probe_gap"] < TOLERANCE
    return probe.result


def text_length(prompts: list[str], responses: list[str]) -> list[float]:
    """Scores that differ between the random model's responses, so that the advantages (and the update) are not 0."""
    return [float(len(r)) for r in responses]


def optim(lr: float) -> dict:
    return dict(
        optimizer=lambda p: torch.optim.AdamW(p, lr=lr),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0),
    )


def engine() -> VLLMEngine:
    return VLLMEngine(kv_cache_memory_bytes=64 << 20)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ppo_update_reaches_the_engine(vllm_model_dir, vllm_prompts, lora):
    module = PPOModule(
        policy=ModelSpec(str(vllm_model_dir), lora=LORA if lora else None),
        value_head=True,
        reward=RewardConfig(fn=text_length),
        sampling=SamplingConfig(max_new_tokens=6, temperature=0.8),
        ppo=PPOConfig(ppo_epochs=1, num_mini_batches=1),
        engine=engine(),
        **optim(0.05 if lora else 0.01),
    )
    result = fit_one_iteration(module, vllm_prompts, 0.8)
    assert result["lora"] is lora  # a LoRA policy is served as base + adapter, never merged
    assert result["syncs"] == 2 and result["sync_seconds"] > 0  # bind + the update's sync
    assert result["new"] < TOLERANCE
    assert result["old"] > 100 * TOLERANCE  # the update moved the log-probs: the engine has the new weights


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_grpo_update_reaches_the_engine(vllm_model_dir, vllm_prompts, lora):
    module = CriticFreeModule(
        policy=ModelSpec(str(vllm_model_dir), lora=LORA if lora else None),
        reward=RewardConfig(fn=text_length),
        sampling=SamplingConfig(max_new_tokens=6),
        algorithm=CriticFreeConfig(group_size=2),
        engine=engine(),
        **optim(0.05 if lora else 0.01),
    )
    result = fit_one_iteration(module, vllm_prompts, 1.0)
    assert result["lora"] is lora and result["syncs"] == 2
    assert result["new"] < TOLERANCE and result["old"] > 100 * TOLERANCE


def test_shared_base_serves_the_policy_adapter_alone(vllm_model_dir, vllm_prompts):
    module = PPOModule(
        policy=ModelSpec(str(vllm_model_dir), lora=LORA),
        shared_base=SharedBaseConfig(critic_init="zero", critic_lora=LoraSpec(r=2, alpha=4)),
        reward=RewardConfig(fn=text_length),
        sampling=SamplingConfig(max_new_tokens=6),
        ppo=PPOConfig(ppo_epochs=1, num_mini_batches=1),
        engine=engine(),
        **optim(0.05),
    )
    result = fit_one_iteration(module, vllm_prompts, 1.0)
    assert result["lora"] and result["syncs"] == 2
    assert result["new"] < TOLERANCE and result["old"] > 100 * TOLERANCE


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32_base", "4bit_base"])
def test_a_lora_sync_that_copies_nothing_is_caught(vllm_model_dir, monkeypatch, four_bit):
    """A LoRA policy (on an fp32 or a 4-bit base: the engine gets the dequantized base and the adapter apart,
    nothing merged) after adapter updates; a sync that copies nothing is caught by the guard."""
    from lit_rlhf.hf import QuantizationSpec, load_model, load_tokenizer
    from tests.helpers import randomize_lora

    tokenizer = load_tokenizer(str(vllm_model_dir), padding_side="left")
    quantization = QuantizationSpec(bits=4, compute_dtype="float32") if four_bit else None
    spec = ModelSpec(str(vllm_model_dir), lora=LORA, quantization=quantization)
    policy = load_model(spec, tokenizer, trainable=True)
    assert any(p.dtype == torch.uint8 for p in policy.parameters()) is four_bit
    served = engine()
    served.bind(policy, tokenizer)
    try:
        assert served.adapter is None and served._lora_name == "default"
        assert served.last_sync_gap < TOLERANCE  # the 4-bit base's dequantized weights are the trainer's
        randomize_lora(policy, 0.3, seed=1)
        served.sync_weights(policy)  # the adapter is re-loaded in place under the same id
        assert served.last_sync_gap < TOLERANCE
        randomize_lora(policy, 0.3, seed=2)
        monkeypatch.setattr(served, "_push_adapter", lambda policy: None)
        with pytest.raises(RuntimeError, match="stale rollout weights"):
            served.sync_weights(policy)
    finally:
        served.close()


def example_override(tmp_path, model_dir, prompts, run) -> str:
    """A YAML override of configs/examples/grpo_vllm.yaml: the tiny model, a reward function, one iteration."""
    import yaml

    from tests.helpers import trainer_override

    override = {
        "trainer": trainer_override(run, max_epochs=1, limit_train_batches=1),
        "model": {
            "init_args": {
                "policy": {"name_or_path": str(model_dir)},
                "reward_model": None,
                "reward": {"fn": "tests.helpers.count_e"},
                "ptx": None,
                "sampling": {"max_new_tokens": 6},
                "algorithm": {"group_size": 2, "ppo_epochs": 1, "num_mini_batches": 1, "micro_batch_size": 4},
                "engine": {"init_args": {"kv_cache_memory_bytes": 64 << 20}},
            }
        },
        "data": {"init_args": {"train_data": str(prompts), "val_data": None, "batch_size": 4}},
    }
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    return str(path)


EXAMPLE = str(ROOT / "configs" / "examples" / "grpo_vllm.yaml")


def test_the_example_yaml_runs_grpo_with_vllm(tmp_path, vllm_model_dir, vllm_prompts):
    """configs/examples/grpo_vllm.yaml end to end through the CLI: one iteration, a checkpoint and an export."""
    from lit_rlhf.cli import main

    run = tmp_path / "grpo"
    main(["fit", "--config", EXAMPLE, "--config", example_override(tmp_path, vllm_model_dir, vllm_prompts, run)])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    assert (run / "export" / "config.json").exists()


@pytest.mark.timeout(600)
def test_ddp_on_two_cpu_processes_one_engine_each(tmp_path, vllm_model_dir, vllm_prompts):
    """Under DDP every process binds its own in-process engine for its own share of the prompts (the data
    module's distributed sampler); the engines' shutdown leaves the trainer's process group alone (vLLM's would
    destroy it): the run ends with its checkpoint and export."""
    import subprocess
    import sys

    run = tmp_path / "grpo-ddp"
    override = example_override(tmp_path, vllm_model_dir, vllm_prompts, run)
    args = ["fit", "--config", EXAMPLE, "--config", override, "--trainer.devices=2", "--trainer.strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_NO_USAGE_STATS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "lit_rlhf", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=540
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    assert (run / "export" / "config.json").exists()
