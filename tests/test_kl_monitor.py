"""KLMonitor: warnings, and a clean stop (checkpoint first) on a KL blow-up or a NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lit_rlhf.callbacks.kl_monitor import KLMonitor
from lit_rlhf.datamodules.prompts import PromptDataModule
from lit_rlhf.hf import ModelSpec
from lit_rlhf.models.ppo import KLConfig, PPOConfig, PPOModule, RewardConfig, SamplingConfig
from lit_rlhf.quickstart.task import prompt_examples
from tests.helpers import cpu_trainer


class ScriptedKL(BoringModel):
    """Returns a scripted ``kl`` from each training step (automatic optimization)."""

    def __init__(self, kls: list[float]) -> None:
        super().__init__()
        self.kls = kls

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        return {**out, "kl": torch.tensor(self.kls[batch_idx])}


def _fit(tmp_path: Path, module: L.LightningModule, monitor: KLMonitor, steps: int) -> L.Trainer:
    trainer = cpu_trainer(max_steps=steps, default_root_dir=tmp_path, callbacks=[monitor])
    trainer.fit(module)
    return trainer


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 80.0])
def test_stops_after_saving_on_nan_or_blow_up(tmp_path, bad):
    module = ScriptedKL([1.0, 2.0, bad, 1.0, 1.0, 1.0])
    monitor = KLMonitor(stop_above=50.0, dirpath=str(tmp_path / "ckpt"))
    trainer = _fit(tmp_path, module, monitor, steps=6)
    assert trainer.global_step == 3  # stopped right after the third step
    assert monitor.stop_checkpoint == tmp_path / "ckpt" / "kl_stop.ckpt"
    checkpoint = torch.load(monitor.stop_checkpoint, weights_only=False)
    assert checkpoint["global_step"] == 3
    expected = "exceeds stop_above=50.0" if math.isfinite(bad) else f"KL is {bad}"
    assert expected in monitor.stop_reason


def test_warns_below_and_above_without_stopping(tmp_path):
    module = ScriptedKL([-3.0, 25.0, 1.0])
    with pytest.warns(UserWarning) as record:
        trainer = _fit(tmp_path, module, KLMonitor(warn_below=-1.0, warn_above=20.0, stop_above=None), steps=3)
    messages = [str(w.message) for w in record]
    assert any("-3.00 nats is below warn_below=-1.0" in m for m in messages)
    assert any("25.00 nats exceeds warn_above=20.0" in m for m in messages)
    assert trainer.global_step == 3 and not (tmp_path / "kl_stop.ckpt").exists()


def test_needs_a_kl_in_the_step_output(tmp_path):
    with pytest.raises(KeyError, match="KLMonitor needs training_step to return a dict with 'kl'"):
        _fit(tmp_path, BoringModel(), KLMonitor(), steps=1)
    with pytest.raises(ValueError, match="warn_below must be <= 0"):
        KLMonitor(warn_below=1.0)


def test_stops_a_ppo_run_forced_to_blow_up(tmp_path, tiny_model_dir):
    """A far too large learning rate drives the policy away from the reference within a few iterations."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_examples(64, seed=1)))
    L.seed_everything(0)
    module = PPOModule(
        policy=ModelSpec(str(tiny_model_dir)),
        value_head=True,
        reward=RewardConfig(fn=lambda p, r: [float(x.count("e")) for x in r]),
        sampling=SamplingConfig(max_new_tokens=6),
        ppo=PPOConfig(ppo_epochs=4),
        kl=KLConfig(coef=0.0, estimator="k3"),
        optimizer=lambda params: torch.optim.SGD(params, lr=50.0),
    )
    monitor = KLMonitor(warn_above=2.0, stop_above=5.0)
    kls = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            kls.append(float(outputs["kl"]))

    trainer = L.Trainer(
        max_steps=4 * 10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[Record(), monitor],
    )
    with pytest.warns(UserWarning):
        trainer.fit(module, PromptDataModule(str(prompts), batch_size=16))
    assert kls[0] == 0.0  # first rollout: the policy still is the reference
    assert len(kls) < 10 and not kls[-1] <= 5.0  # stopped at the first KL above 5 nats (measured: 36 at the 2nd)
    assert all(kl <= 5.0 for kl in kls[:-1])
    assert (tmp_path / "kl_stop.ckpt").is_file() and monitor.stop_reason is not None
    assert torch.load(tmp_path / "kl_stop.ckpt", weights_only=False)["ppo_state"]["iteration"] == len(kls)
