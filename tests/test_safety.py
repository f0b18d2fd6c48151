"""Reliability and safety: numerical faults, untrusted files, determinism."""

from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_rlhf import ModelSpec, SFTDataModule, SFTModule
from lit_rlhf.checkpointing import SafeCheckpointIO
from lit_rlhf.cli import main
from tests.helpers import RecordLosses, read_losses

ROOT = Path(__file__).resolve().parents[1]


class FaultySFT(SFTModule):
    """Produces a NaN loss on the training batches listed in ``bad_batches``."""

    def __init__(self, *args, bad_batches=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_batches = set(bad_batches)
        self.batch_idx = -1

    def training_step(self, batch, batch_idx):
        self.batch_idx = batch_idx
        return super().training_step(batch, batch_idx)

    def _nll_and_correct(self, batch):
        nll, n, correct = super()._nll_and_correct(batch)
        if self.training and self.batch_idx in self.bad_batches:
            nll = nll * float("nan")
        return nll, n, correct


def run(model_dir, sft_jsonl, tmp_path, bad_batches, max_steps):
    module = FaultySFT(ModelSpec(str(model_dir)), bad_batches=bad_batches)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=0), RecordLosses(str(tmp_path / "l.jsonl"))],
    )
    trainer.fit(module, datamodule=SFTDataModule(str(sft_jsonl[0]), batch_size=8))
    return module, trainer


def test_a_nan_loss_never_reaches_the_optimizer(tiny_model_dir, sft_jsonl, tmp_path):
    module, trainer = run(tiny_model_dir, sft_jsonl, tmp_path, bad_batches={2}, max_steps=4)
    assert module.faults_total == 1 and module.last_fault == "loss" and module.fault_streak == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert trainer.global_step == 4 and trainer.fit_loop.epoch_loop.batch_idx == 4  # 5 batches, 4 steps
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4  # the schedule follows real steps
    assert not (tmp_path / "ck" / "last.ckpt").exists()


def test_repeated_faults_stop_cleanly_with_a_checkpoint_and_a_message(tiny_model_dir, sft_jsonl, tmp_path):
    with pytest.warns(UserWarning, match=r"3 consecutive optimizer steps were skipped because the loss was NaN"):
        module, trainer = run(tiny_model_dir, sft_jsonl, tmp_path, bad_batches={1, 2, 3, 4, 5}, max_steps=20)
    assert trainer.global_step < 20 and module.fault_streak == 3
    ckpt = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/lit_rlhf_pwned_marker"),))


def test_checkpoints_load_with_weights_only(tmp_path):
    marker = Path("/tmp/lit_rlhf_pwned_marker")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode()}, path)
    with pytest.raises(pickle.UnpicklingError):
        SafeCheckpointIO().load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights_only=True only"):
        SafeCheckpointIO().load_checkpoint(path, weights_only=False)


def test_cli_refuses_an_untrusted_checkpoint(tiny_model_dir, sft_jsonl, tmp_path):
    marker = Path("/tmp/lit_rlhf_pwned_marker")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode()}, path)
    args = [
        "fit",
        "--config",
        str(ROOT / "configs/quickstart/sft.yaml"),
        "--trainer.logger=false",
        f"--model.init_args.model.name_or_path={tiny_model_dir}",
        f"--data.init_args.train_data={sft_jsonl[0]}",
        f"--data.init_args.val_data={sft_jsonl[1]}",
        "--trainer.callbacks=[]",
        f"--ckpt_path={path}",
    ]
    with pytest.raises(pickle.UnpicklingError):
        main(args)
    assert not marker.exists()


def test_yaml_configs_are_loaded_safely(tmp_path):
    marker = tmp_path / "marker"
    config = tmp_path / "evil.yaml"
    config.write_text(f"seed_everything: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SystemExit):
        main(["--config", str(ROOT / "configs/quickstart/sft.yaml"), "--config", str(config)], run=False)
    assert not marker.exists()


def test_remote_code_is_off_unless_asked():
    assert ModelSpec("x").trust_remote_code is False
    text = (ROOT / "lit_rlhf").rglob("*.py")
    offenders = [p for p in text if "trust_remote_code=True" in p.read_text()]
    assert offenders == []


def test_same_config_same_metrics_twice(tiny_model_dir, sft_jsonl, tmp_path):
    def losses(name):
        L.seed_everything(0)
        module = SFTModule(ModelSpec(str(tiny_model_dir)), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
        L.Trainer(
            accelerator="cpu",
            max_steps=5,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            callbacks=[RecordLosses(str(tmp_path / name))],
        ).fit(module, datamodule=SFTDataModule(str(sft_jsonl[0])))
        return read_losses(tmp_path / name)

    first, second = losses("a.jsonl"), losses("b.jsonl")
    assert len(first) == 5 and first == second
    assert yaml.safe_load("a: 1") == {"a": 1}


def test_an_interrupted_export_leaves_the_previous_one_intact(tiny_model_dir, tmp_path, monkeypatch):
    from lit_rlhf.hf import load_model, load_tokenizer, save_pretrained_atomic

    spec = ModelSpec(str(tiny_model_dir))
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer)
    export = tmp_path / "export"
    save_pretrained_atomic(model, tokenizer, export, spec)
    before = {p.name: p.read_bytes() for p in export.iterdir()}

    def crash(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt("power cut while writing weights")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_atomic(model, tokenizer, export, spec)
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "no half-written folder left behind"


def test_an_interrupted_checkpoint_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt("pre-empted mid-save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1


class Killed(BaseException):
    """Stands for SIGKILL: raised at one step of an export swap, after which the 'process' runs nothing more."""


def _kill_swap_at(step: int, monkeypatch, exchange: bool) -> dict:
    """Make the ``step``-th file operation of the next export swap 'kill the process'."""
    import pathlib
    import shutil

    from lit_rlhf import outputs
    from lit_rlhf.hf import export

    state = {"armed": False, "count": 0, "dead": False}

    def op(real):
        def wrapper(*args, **kwargs):
            if state["dead"]:
                return None  # nothing runs after a kill: no except/finally clean-up either
            if state["armed"]:
                if state["count"] == step:
                    state["dead"] = True
                    raise Killed(step)
                state["count"] += 1
            return real(*args, **kwargs)

        return wrapper

    real_replace = outputs.replace_dir

    def replace(src, dst):
        state["armed"] = True
        try:
            real_replace(src, dst)
        finally:
            state["armed"] = False

    monkeypatch.setattr(pathlib.Path, "rename", op(pathlib.Path.rename))
    monkeypatch.setattr(shutil, "rmtree", op(shutil.rmtree))
    monkeypatch.setattr(outputs, "_exchange_dirs", op(outputs._exchange_dirs if exchange else lambda a, b: False))
    monkeypatch.setattr(export, "replace_dir", replace)  # where save_pretrained_atomic looks it up
    return state


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_an_export_killed_at_any_step_of_the_swap_never_vanishes(tiny_model_dir, tmp_path, monkeypatch, exchange):
    from lit_rlhf.hf import load_model, load_tokenizer, save_pretrained_atomic

    spec = ModelSpec(str(tiny_model_dir))
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer)
    export = tmp_path / "export"
    save_pretrained_atomic(model, tokenizer, export, spec)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    new = {k: v.clone() for k, v in model.state_dict().items()}

    def holds(path) -> str:
        loaded = load_model(ModelSpec(str(path)), load_tokenizer(ModelSpec(str(path))), trainable=False).state_dict()
        for name, weights in (("old", old), ("new", new)):
            if all(torch.equal(loaded[k], weights[k]) for k in weights):
                return name
        raise AssertionError("the export holds neither the old nor the new weights")

    outcomes = []
    for step in range(10):
        if holds(export) == "new":  # start every trial from the old export
            save_pretrained_atomic(load_model(spec, tokenizer), tokenizer, export, spec)
        state = _kill_swap_at(step, monkeypatch, exchange)
        with contextlib.suppress(Killed):
            save_pretrained_atomic(model, tokenizer, export, spec)
        monkeypatch.undo()
        if not state["dead"]:
            break  # every step of the swap has been tried
        if exchange:  # atomic: a complete export is there at once, without any recovery
            assert (export / "config.json").exists(), step
        outcomes.append(holds(export))  # loading recovers a swap killed between its two renames
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["export"]
        save_pretrained_atomic(model, tokenizer, export, spec)  # the next export cleans up after the killed one
        assert holds(export) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["export"], step
        save_pretrained_atomic(load_model(spec, tokenizer), tokenizer, export, spec)
    assert len(outcomes) == (2 if exchange else 5), outcomes  # the file operations of each kind of swap
    assert outcomes[0] == "old" and outcomes[-1] == "new", outcomes


def test_a_missing_local_model_folder_is_named_and_hub_ids_still_go_to_the_hub(tiny_tokenizer, tmp_path, monkeypatch):
    from lit_rlhf.errors import ConfigError
    from lit_rlhf.hf import load_model, load_tokenizer
    from lit_rlhf.hf.loading import check_local_source, looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    missing = ["./base", str(tmp_path / "base"), "~/no-such-lit-rlhf-model", "runs/quickstart/base", "models/base"]
    for path in missing:
        with pytest.raises(ConfigError, match=f"^no such folder: {re.escape(path)}$"):
            load_tokenizer(path)
        with pytest.raises(ConfigError, match=f"^no such folder: {re.escape(path)}$"):
            load_model(ModelSpec(path), tiny_tokenizer)
    for hub_id in ["Qwen/Qwen2.5-0.5B", "gpt2", "org/name"]:
        assert not looks_local(hub_id)
        check_local_source(hub_id)  # left to the hub client
