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
