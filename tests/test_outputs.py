"""One setting moves every output of a stage: ``--trainer.default_root_dir`` (checkpoints, logs, export)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.test_preemption import command, run, workdir
from tests.test_preemption import quickstart_layout as quickstart_layout  # a fixture, shared


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_default_root_dir_moves_every_output_and_leaves_the_quickstart_untouched(quickstart_layout, tmp_path):
    cwd = workdir(quickstart_layout, tmp_path / "run")
    before = snapshot(cwd / "runs" / "quickstart")
    result = run(command("rm", "--trainer.max_epochs=1", "--trainer.default_root_dir=runs/my-rm"), cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(cwd / "runs" / "quickstart") == before  # byte-identical: not one file added or changed
    mine = cwd / "runs" / "my-rm"
    assert (mine / "checkpoints" / "last.ckpt").is_file()
    assert (mine / "logs" / "metrics.csv").is_file()
    assert (mine / "export" / "config.json").is_file() and (mine / "export" / "model.safetensors").is_file()


def test_a_rerun_moves_the_earlier_outputs_aside_and_deletes_nothing(quickstart_layout, tmp_path):
    cwd = workdir(quickstart_layout, tmp_path / "run")
    args = ("rm", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.default_root_dir=runs/r")
    first = run(command(*args), cwd)
    assert first.returncode == 0, first.stderr[-3000:]
    root = cwd / "runs" / "r"
    earlier = snapshot(root)
    assert {"checkpoints/last.ckpt", "logs/metrics.csv", "export/config.json"} <= set(earlier)
    second = run(command(*args), cwd)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "kept in" in second.stdout and str(Path("r") / "previous" / "1") in second.stdout
    assert snapshot(root / "previous" / "1") == earlier  # every file of the first run, byte for byte
    now = snapshot(root)
    assert {"checkpoints/last.ckpt", "logs/metrics.csv", "export/config.json"} <= set(now)  # the new run's own


def test_keep_earlier_numbers_runs_and_keeps_paths_relative_to_the_root(tmp_path):
    from lit_rlhf.outputs import keep_earlier

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "w.bin").write_text("1")
    (tmp_path / "logs").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("o")
    assert keep_earlier(
        [tmp_path / "export", tmp_path / "export" / "w.bin", tmp_path / "missing", outside], tmp_path
    ) == (tmp_path / "previous" / "1")
    assert (tmp_path / "previous" / "1" / "export" / "w.bin").read_text() == "1"
    assert (tmp_path / "previous" / "1" / outside.name).read_text() == "o" and not outside.exists()
    assert (tmp_path / "logs").is_dir()  # not named: untouched
    assert keep_earlier([tmp_path / "missing"], tmp_path) is None
    assert keep_earlier([tmp_path / "logs"], tmp_path) == tmp_path / "previous" / "2"
