"""``lit_rlhf.evaluation`` under torchrun (2 CPU processes, gloo) against one process.

The batches are shared out over the processes (batch ``k`` sampled with seed ``seed + k`` wherever it runs),
with whole models on each process and with every model sharded (``--shard fsdp2``, and ``--shard fsdp1``, whose
root unit's weights are gathered around each call on the wrapped model); rank 0 must write the summary and rows
of the single process. The policy ends its responses at different lengths (its EOS row scaled up), and 9 prompts
in batches of 2 make 5 batches: 3 on one process, 2 on the other (sharded, the other repeats one, since every
sharded forward needs both; its responses end at other steps: ``synced_gpus``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lit_rlhf.evaluation import evaluate
from tests.sharded.test_fsdp2 import ROOT, env

pytestmark = pytest.mark.usefixtures("one_multiprocess_test_at_a_time")

#: short enough that a hang fails the test in a minute
TIMEOUT_S = 60.0
#: texts of 1 to 6 words (prompts of different lengths: left padding differs from batch to batch)
PROMPTS = [
    "The movie was",
    "a",
    "I thought the book was",
    "The hotel",
    "Overall the service was quite",
    "We",
    "The food at the restaurant was really",
    "It",
    "The staff were",
]


def ending_policy(tiny_model_dir: Path, out: Path) -> Path:
    """The tiny model with its EOS logit scaled ×32: responses end after 1 to 8 tokens, or run to the cap."""
    shutil.copytree(tiny_model_dir, out)
    weights = load_file(out / "model.safetensors")
    eos = json.loads((out / "config.json").read_text())["eos_token_id"]
    weights["lm_head.weight"][eos] *= 32
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def arguments(paths: dict[str, str], output_dir: Path) -> dict:
    return dict(
        policy=paths["policy"],
        prompts=paths["prompts"],
        baseline=paths["baseline"],
        reference=paths["baseline"],
        reward_model=paths["reward_model"],
        reward_fn="tests.helpers:count_e",
        max_new_tokens=8,
        batch_size=2,
        seed=3,
        output_dir=str(output_dir),
    )


def torchrun_evaluation(kwargs: dict, *extra: str) -> subprocess.Popen:
    flags = [f"--{k}={v}" for k, v in kwargs.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "lit_rlhf.evaluation", *flags, f"--timeout_s={TIMEOUT_S}", *extra]
    return subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read(output_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((output_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    return summary, rows


@pytest.mark.timeout(600)
def test_evaluation_on_two_processes_replicated_fsdp2_and_fsdp1_equals_one_process(
    tiny_model_dir, tiny_classifier_dir, tmp_path
):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    paths = {
        "policy": str(ending_policy(tiny_model_dir, tmp_path / "policy")),
        "baseline": str(tiny_model_dir),
        "reward_model": str(tiny_classifier_dir),
        "prompts": str(prompts),
    }
    replicated = torchrun_evaluation(arguments(paths, tmp_path / "replicated"))
    evaluate(**arguments(paths, tmp_path / "single"))
    output, _ = replicated.communicate(timeout=10 * TIMEOUT_S)
    assert replicated.returncode == 0, output[-4000:]
    assert output.count('"response_length"') == 1, output[-3000:]  # rank 0 alone prints the summary
    # FSDP2 and FSDP1 side by side (two process groups of their own): the test's time is mostly start-up
    sharded = {s: torchrun_evaluation(arguments(paths, tmp_path / s), f"--shard={s}") for s in ("fsdp2", "fsdp1")}
    for shard, run in sharded.items():
        output, _ = run.communicate(timeout=10 * TIMEOUT_S)
        assert run.returncode == 0, (shard, output[-4000:])
        # every model really is sharded: rank 0 holds part of its weights between forwards (not a no-op wrap)
        held = re.findall(
            rf"\[evaluation\] (\S+) sharded \({shard}\): rank 0 holds ([\d,]+) of its ([\d,]+) weights", output
        )
        assert sorted(name for name, _, _ in held) == sorted(
            [paths["reward_model"], paths["policy"], paths["baseline"], paths["baseline"]]
        ), (shard, output[-3000:])
        for name, part, whole in held:
            part, whole = int(part.replace(",", "")), int(whole.replace(",", ""))
            assert 0.25 * whole < part < 0.75 * whole, (shard, name, part, whole)

    summary, rows = read(tmp_path / "single")
    # the case this test is about: some responses end early, at different lengths, others run to the cap
    assert 0 < summary["eos_rate"] < 1 and len({len(r["policy_response"]) for r in rows}) > 3
    assert summary["kl_to_reference"] != 0 and len(rows) == len(PROMPTS)
    for side in ("replicated", "fsdp2", "fsdp1"):
        other_summary, other_rows = read(tmp_path / side)
        assert list(other_summary) == list(summary), side
        assert other_summary == pytest.approx(summary, abs=1e-6, rel=0), side
        assert [r["prompt"] for r in other_rows] == PROMPTS, side
        for row, other in zip(rows, other_rows, strict=True):
            for key, value in row.items():
                if isinstance(value, float):
                    assert other[key] == pytest.approx(value, abs=1e-6, rel=0), (side, key)
                else:
                    assert other[key] == value, (side, key)
