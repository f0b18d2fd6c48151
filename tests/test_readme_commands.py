"""The README's commands, run as written on tiny inputs laid out where the shipped configs look for them."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lit_rlhf.hf import load_tokenizer
from lit_rlhf.quickstart.task import sft_examples
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
FIT_LOG = "epoch,step,train/loss\n0,0,5.5\n0,1,5.25\n"


def readme_command(marker: str) -> list[str]:
    """The README's shell command (a fenced bash block) that contains ``marker``, as argv."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    text = next(b for b in blocks if marker in b).replace("\\\n", " ")
    command = next(line for line in text.splitlines() if marker in line)
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "lit_rlhf"], args
    return [sys.executable, *args[1:]]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def one_token_model(source: Path, dest: Path, token_id: int) -> None:
    """A copy of ``source`` that answers ``token_id`` after any input: the layers add nothing to the residual
    stream, every embedding is the same vector, and the output head only scores ``token_id``."""
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        model.get_input_embeddings().weight.fill_(1.0)
        head = model.get_output_embeddings().weight
        head.zero_()
        head[token_id] = 10.0
    model.save_pretrained(dest)
    load_tokenizer(str(source)).save_pretrained(dest)


def test_the_readme_sft_predict_command_answers_with_the_trained_export_and_keeps_the_logs(tiny_model_dir, tmp_path):
    shutil.copytree(ROOT / "configs" / "quickstart", tmp_path / "configs" / "quickstart")  # run from the "repository"
    quickstart = tmp_path / "runs" / "quickstart"
    shutil.copytree(tiny_model_dir, quickstart / "base")  # what the config's own `model` names
    token = load_tokenizer(str(tiny_model_dir))(" great", add_special_tokens=False)["input_ids"][0]
    one_token_model(tiny_model_dir, quickstart / "sft" / "export", token)
    logs = quickstart / "sft" / "logs"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text(FIT_LOG)
    (logs / "config.yaml").write_text("# the fit's config\n")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in sft_examples(3, seed=0)])

    run(readme_command("predict --config configs/quickstart/sft.yaml"), tmp_path)

    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = load_tokenizer(str(tiny_model_dir)).decode([token] * 16)  # sft.yaml: max_new_tokens 16
    assert [r["completion"] for r in rows] == [expected] * 3, "answered by the SFT export, not the base model"
    assert (logs / "metrics.csv").read_text() == FIT_LOG
    assert (logs / "config.yaml").read_text() == "# the fit's config\n"


def test_validate_with_a_stage_config_keeps_the_fit_log(tiny_model_dir, sft_jsonl, tmp_path):
    quickstart = tmp_path / "runs" / "quickstart"
    shutil.copytree(tiny_model_dir, quickstart / "base")
    logs = quickstart / "sft" / "logs"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text(FIT_LOG)
    cmd = [sys.executable, "-m", "lit_rlhf", "validate", "--config", str(ROOT / "configs/quickstart/sft.yaml")]
    run([*cmd, f"--data.init_args.train_data={sft_jsonl[0]}", f"--data.init_args.val_data={sft_jsonl[1]}"], tmp_path)
    assert (logs / "metrics.csv").read_text() == FIT_LOG
    validated = (logs / "metrics.validate.csv").read_text().splitlines()
    assert "val/loss" in validated[0] and len(validated) == 2  # header and one row
    assert float(validated[1].split(",")[validated[0].split(",").index("val/loss")]) > 0
