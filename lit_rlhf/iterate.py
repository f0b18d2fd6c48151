"""Iterated RLHF (InstructGPT §3.5 repeated): sample from the current policy, rank, retrain the RM, continue PPO.

``python -m lit_rlhf.iterate --config configs/iterate/quickstart.yaml`` runs ``rounds`` rounds under
``run_dir``; round ``r`` (1-based) writes everything into ``run_dir/round_<r>/``:

1. **collect** (every round but the first when ``initial_comparisons`` are given, which stand for the round-1
   labels): ``task.jsonl``, ``k`` responses per prompt sampled from round ``r−1``'s policy (the SFT model
   before round 1), and ``labelled.jsonl``, the same rows ranked by the judge
   (:mod:`lit_rlhf.labelling`);
2. **reward model**: ``comparisons.jsonl`` = the initial comparisons + every round's labels so far, and an RM
   *retrained* from the SFT export on it by the stage config (``rm.config``, e.g.
   ``configs/quickstart/rm.yaml``), whose ``RewardNormalization`` refits the bias on the demonstrations, so
   every round's scores are centred the same way. Retraining (InstructGPT) rather than fine-tuning keeps
   each round's RM a function of the comparisons alone, not of the order they arrived in;
3. **PPO** with the stage config (``ppo.config``) from round ``r−1``'s policy and critic exports (the
   critic is exported beside the policy, ``ppo/critic``), so the value function does not restart from
   scratch; the KL reference stays the **original SFT model** in every round (otherwise the KL budget
   would reset each round and the policy could drift without bound). ``critic: reward_model`` instead
   re-initialises the critic from the new RM each round (InstructGPT's initialisation);
4. **evaluation** on held-out prompts (``eval/summary.json``): gold and RM scores of the round's policy and
   of the SFT policy, KL to SFT, and how much the policy exploits the RM (:func:`rm_gold_gap`).

Stage configs are reused as they are: their output folder (``outputs``, e.g. ``runs/quickstart/rm``) is moved
into the round's folder by a second, generated ``--config`` (``round_<r>/<stage>.outputs.yaml``: only the
keys that name that folder), and the inputs (models, training file, seeds) are CLI overrides, so the command
of each stage is the ordinary ``python -m lit_rlhf fit --config <stage>.yaml ...`` and is printed.
Finally ``run_dir/report/report.md`` compares the rounds and plots the PPO curves across them.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lit_rlhf.datamodules.base import write_jsonl
from lit_rlhf.datamodules.prompts import PromptRow
from lit_rlhf.imports import RewardFn
from lit_rlhf.labelling import label_ranking_task, read_prompts, read_rankings, write_ranking_task
from lit_rlhf.outputs import keep_earlier


@dataclass
class Stage:
    """A stage config reused by every round.

    Args:
        config: the stage's YAML (``python -m lit_rlhf fit --config <config>``).
        outputs: the folder under which that YAML writes its outputs; every path under it is moved to the
            round's ``<stage>/`` folder.
        overrides: extra CLI overrides for every round (e.g. fewer steps).
    """

    config: str
    outputs: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class Judge:
    """Who ranks the sampled responses: a reward-model export or a ``reward_fn`` import path (exactly one); a
    ``reward_fn`` gets each prompt row's other columns as keyword arguments (docs/conventions.md#reward-functions)."""

    reward_model: str | None = None
    reward_fn: str | RewardFn | None = None


@dataclass
class Evaluation:
    """Held-out evaluation after each round (:func:`lit_rlhf.evaluation.evaluate`).

    Args:
        prompts: held-out prompts (a file or dataset in any format that holds a prompt, docs/data.md).
        reward_fn: the gold judge, ``package.module:function``.
        num_samples: responses per prompt.
    """

    prompts: str
    reward_fn: str
    num_samples: int = 4


def relocate(value: Any, old: str, new: str) -> Any:
    """``value`` with every string path equal to or under ``old`` moved under ``new`` (dicts/lists walked)."""
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new + value[len(old.rstrip("/")) :]
    if isinstance(value, dict):
        return {k: relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, old, new) for v in value]
    return value


def output_overrides(stage: Stage, folder: Path, extra_callbacks: list[dict] = ()) -> dict[str, Any]:
    """The keys of ``stage.config`` that name ``stage.outputs``, moved to ``folder`` (a config to stack on it).

    Whole top-level-section keys are replaced (a later ``--config`` replaces a list, e.g. ``callbacks``,
    as a whole), so the result is the stage's own values with only the output paths changed.
    """
    config = yaml.safe_load(Path(stage.config).read_text())
    moved = relocate(config, stage.outputs, str(folder))
    overrides: dict[str, Any] = {}
    for section, values in moved.items():
        if isinstance(values, dict):
            changed = {k: v for k, v in values.items() if v != config[section].get(k)}
            if changed:
                overrides[section] = changed
    if extra_callbacks:
        callbacks = moved.get("trainer", {}).get("callbacks") or []
        overrides.setdefault("trainer", {})["callbacks"] = [*callbacks, *extra_callbacks]
    return overrides


def run_stage(stage: Stage, folder: Path, inputs: list[str], extra_callbacks: list[dict] = ()) -> float:
    """Run ``python -m lit_rlhf fit`` with the stage config, its outputs moved to ``folder``; return seconds."""
    outputs = folder.parent / f"{folder.name}.outputs.yaml"
    outputs.parent.mkdir(parents=True, exist_ok=True)
    outputs.write_text(yaml.safe_dump(output_overrides(stage, folder, extra_callbacks), sort_keys=False))
    command = [sys.executable, "-m", "lit_rlhf", "fit", "--config", stage.config, "--config", str(outputs)]
    command += [*inputs, *stage.overrides]
    print(f"[iterate] {' '.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def keep_earlier_run(root: Path) -> None:
    """Move an earlier run's rounds and report into ``<root>/previous/<k>/`` (announced): stale logs or exports
    would mix with this run's, and nothing an earlier run wrote is deleted."""
    earlier = [*root.glob("round_*"), root / "rounds.jsonl", root / "report"]
    kept = keep_earlier(earlier, root)
    if kept is not None:
        print(f"[iterate] earlier outputs of {root} kept in {kept}", flush=True)


def round_prompts(prompts: str, n: int | None, seed: int) -> list[PromptRow]:
    """``n`` prompt rows drawn (seeded, without replacement) from the prompt set, in any format that holds a
    prompt, with their other columns (for the judge); all of them when ``n`` is None."""
    pool = read_prompts(prompts)
    return pool if n is None or n >= len(pool) else random.Random(seed).sample(pool, n)


def collect(policy: str, folder: Path, prompts: list[PromptRow], judge: Judge, sampling: dict[str, Any]) -> Path:
    """Sample a ranking task from ``policy``, rank it by the judge, validate it; return the labelled file."""
    task = write_ranking_task(policy, prompts, str(folder / "task.jsonl"), **sampling)
    labelled = label_ranking_task(str(task), str(folder / "labelled.jsonl"), judge.reward_model, judge.reward_fn)
    read_rankings(str(labelled))  # the check applied to human labels holds for the judge's too
    return labelled


def merge_comparisons(sources: list[str], output: Path) -> int:
    """Concatenate comparison files (the RM's training set of a round); return the row count."""
    rows = [line for source in sources for line in Path(source).read_text(encoding="utf-8").splitlines() if line]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(line + "\n" for line in rows), encoding="utf-8")
    return len(rows)


def rm_gold_gap(rows: list[dict[str, float]]) -> dict[str, float]:
    """How much the policy exploits the RM: its RM score in gold units minus its gold score (held-out mean).

    RM and gold scores live on different scales (normalised RM logits vs VADER's [-1, 1]), so the RM score is
    first mapped to gold units by the least-squares line fitted on the **SFT** policy's samples, where the
    RM was trained to agree with the labeller. A positive gap is reward the RM grants that the gold judge
    does not: over-optimisation.
    """
    x = [r["baseline_rm_score"] for r in rows]
    y = [r["baseline_fn_score"] for r in rows]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    var = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / var if var > 0 else 0.0
    rm_as_gold = sum(my + slope * (r["policy_rm_score"] - mx) for r in rows) / len(rows)
    gold = sum(r["policy_fn_score"] for r in rows) / len(rows)
    return {"rm_as_gold": rm_as_gold, "rm_gold_gap": rm_as_gold - gold}


def evaluate_round(folder: Path, sft: str, spec: Evaluation, seed: int) -> dict[str, float]:
    """Held-out evaluation of the round's policy against the SFT policy, with the round's RM and the gold judge."""
    from lit_rlhf.evaluation import evaluate

    result = evaluate(
        policy=str(folder / "ppo" / "export"),
        baseline=sft,
        reference=sft,
        reward_model=str(folder / "rm" / "export"),
        reward_fn=spec.reward_fn,
        prompts=spec.prompts,
        num_samples=spec.num_samples,
        seed=seed,
        output_dir=str(folder / "eval"),
    )
    return {**result.summary, **rm_gold_gap(result.rows)}


def rm_inputs(sft: str, comparisons: Path, seed: int) -> list[str]:
    """CLI overrides of a round's RM: retrained from the SFT export on all comparisons so far."""
    return [
        f"--model.init_args.model.name_or_path={sft}",
        f"--data.init_args.train_data={comparisons}",
        f"--seed_everything={seed}",
    ]


def ppo_inputs(r: int, sft: str, policy: str, critic: str, reward_model: str, seed: int) -> list[str]:
    """CLI overrides of round ``r``'s PPO: start models, this round's RM, the SFT reference, the seed."""
    inputs = [
        f"--model.init_args.policy.name_or_path={policy}",
        f"--model.init_args.critic.name_or_path={critic}",
        f"--model.init_args.reward_model.name_or_path={reward_model}",
        f"--model.init_args.seed={seed}",
        f"--seed_everything={seed}",
    ]
    if r > 1:
        # the reference defaults to the policy's spec, which from round 2 on is the last PPO policy
        inputs.append(f"--model.init_args.reference.name_or_path={sft}")
    return inputs


def train_round(
    r: int,
    folder: Path,
    comparisons: list[str],
    sft: str,
    stages: tuple[Stage, Stage],
    start: tuple[str, str | None],
    seed: int,
) -> dict[str, Any]:
    """Retrain the RM on ``comparisons`` and continue PPO from ``start = (policy, critic)`` (critic ``None``:
    from the new RM); return the round's exports and timings."""
    rm, ppo = stages
    policy, critic = start
    n_rows = merge_comparisons(comparisons, folder / "comparisons.jsonl")
    rm_seconds = run_stage(rm, folder / "rm", rm_inputs(sft, folder / "comparisons.jsonl", seed))
    reward_model = str(folder / "rm" / "export")
    critic_export = {
        "class_path": "lit_rlhf.callbacks.HFExport",
        "init_args": {"dirpath": str(folder / "ppo" / "critic"), "method": "export_critic_hf"},
    }
    inputs = ppo_inputs(r, sft, policy, critic or reward_model, reward_model, seed)
    ppo_seconds = run_stage(ppo, folder / "ppo", inputs, [critic_export])
    return {
        "round": r,
        "comparisons": n_rows,
        "policy": str(folder / "ppo" / "export"),
        "critic": str(folder / "ppo" / "critic"),
        "reward_model": reward_model,
        "rm_seconds": rm_seconds,
        "ppo_seconds": ppo_seconds,
    }


def iterate(
    sft: str,
    prompts: str,
    rm: Stage,
    ppo: Stage,
    judge: Judge,
    evaluation: Evaluation | None = None,
    initial_comparisons: list[str] = (),
    run_dir: str = "runs/iterate",
    rounds: int = 2,
    k: int = 4,
    prompts_per_round: int | None = 256,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    critic: Literal["previous", "reward_model"] = "previous",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run ``rounds`` rounds of collect → retrain RM → continue PPO; return (and save) one summary per round.

    Args:
        sft: the SFT export: the policy before round 1, the RM's initialisation and the KL reference throughout.
        prompts: prompt set to sample ranking tasks from (a file or dataset in any format that holds a prompt,
            docs/data.md; the rows' other columns reach a ``reward_fn`` judge).
        rm: reward-model stage config (retrained from ``sft`` on all comparisons so far each round).
        ppo: PPO stage config (continued from the last policy and critic each round).
        judge: ranks the sampled responses (a stand-in for labellers).
        evaluation: held-out evaluation after each round (``None``: skip it and the report).
        initial_comparisons: comparison files available before round 1 (its labels); empty: round 1
            samples from the SFT policy like every later round.
        run_dir: output folder (one ``round_<r>`` folder per round, ``report/``, ``rounds.jsonl``).
        rounds: number of rounds.
        k: responses sampled per prompt.
        prompts_per_round: prompts sampled per round (``None``: all).
        max_new_tokens: response length cap when sampling ranking tasks.
        temperature: sampling temperature of ranking tasks.
        critic: ``previous`` continues from the last round's critic; ``reward_model`` re-initialises it from
            the round's RM.
        seed: base seed; round ``r`` uses ``seed + r − 1`` for sampling, the RM and PPO (so round 1 repeats
            the stage configs' own run when ``seed`` is their seed).
    """
    root, summaries = Path(run_dir), []
    comparisons, policy, last_critic = list(initial_comparisons), sft, None
    keep_earlier_run(root)
    for r in range(1, rounds + 1):
        folder, round_seed, start = root / f"round_{r}", seed + r - 1, time.perf_counter()
        if r > 1 or not initial_comparisons:
            sampling = {"k": k, "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": round_seed}
            chosen = round_prompts(prompts, prompts_per_round, round_seed)
            comparisons.append(str(collect(policy, folder, chosen, judge, sampling)))
        start_critic = None if critic == "reward_model" else last_critic
        summary = train_round(r, folder, comparisons, sft, (rm, ppo), (policy, start_critic), round_seed)
        policy, last_critic = summary["policy"], summary["critic"]
        if evaluation is not None:
            summary.update(evaluate_round(folder, sft, evaluation, seed))
        summary["seconds"] = time.perf_counter() - start
        summaries.append(summary)
        print(f"[iterate] round {r}: {json.dumps(summary)}", flush=True)
    write_jsonl(root / "rounds.jsonl", summaries)
    if evaluation is not None:
        from lit_rlhf.quickstart.report import write_rounds_report

        print(f"[iterate] report: {write_rounds_report(root, summaries)}", flush=True)
    return summaries


def main(args: list[str] | None = None) -> None:
    """``python -m lit_rlhf.iterate --config configs/iterate/quickstart.yaml``: the arguments of :func:`iterate`."""
    from jsonargparse import auto_cli

    auto_cli(iterate, args=args, as_positional=False)


if __name__ == "__main__":
    from lit_rlhf.errors import run_command

    run_command(main)
