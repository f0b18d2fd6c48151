"""``python -m lit_rlhf.quickstart --compare``: PPO, GRPO, RLOO, GSPO, DAPO (and DPO when
``configs/quickstart/dpo.yaml`` exists) trained from the same SFT export, evaluated on the same held-out prompts,
one table and one plot per method, with each method's budget (prompts, samples, optimizer steps, wall time) and a
degenerate-text measure.

Degenerate text: the share of response words that never occur in the task's demonstrations (the SFT data's
prompts and completions). The task's language is a few hundred words; a policy that exploits what the reward
model overrates invents words ("fantasterfeculeasant") or breaks them ("minute ofb"), and those are not in it.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: methods compared, in the report's order; DPO joins when its config exists
RL_METHODS = ("ppo", "grpo", "rloo", "gspo", "dapo")
OPTIONAL_METHODS = ("dpo",)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-case words of ``text`` (letters, with an inner apostrophe: "didn't")."""
    return _WORD.findall(text.lower())


def demonstration_vocabulary(sft_files: Iterable[str | Path]) -> set[str]:
    """Every word of the prompts and completions of the task's demonstrations (SFT jsonl files)."""
    from lit_rlhf.datamodules.base import read_rows

    vocabulary: set[str] = set()
    for path in sft_files:
        for row in read_rows(str(path)):
            for column in ("prompt", "completion"):
                vocabulary.update(words(str(row.data.get(column, ""))))
    return vocabulary


def unknown_word_rate(texts: Iterable[str], vocabulary: set[str]) -> float:
    """Share of the words of ``texts`` that are not in ``vocabulary`` (0 when there is no word at all)."""
    all_words = [w for text in texts for w in words(text)]
    return sum(w not in vocabulary for w in all_words) / len(all_words) if all_words else 0.0


@dataclass
class Budget:
    """What a method consumed: training batches (iterations for the RL methods, optimizer steps for DPO),
    prompts seen, responses sampled, optimizer steps and wall time."""

    batches: int
    prompts: int
    samples: int
    optimizer_steps: int
    seconds: float


def _config(method: str, run_dir: Path, config_dir: Path) -> dict:
    """The run's resolved config (LightningCLI's ``config.yaml``, command-line overrides included), else the
    shipped YAML."""
    import yaml

    saved = sorted((run_dir / method).rglob("config.yaml"))
    return yaml.safe_load((saved[-1] if saved else config_dir / f"{method}.yaml").read_text())


def read_budget(method: str, run_dir: Path, config_dir: Path, seconds: float) -> Budget:
    """The budget of a finished run, from its last checkpoint's loop counters and its config."""
    import torch

    ckpt = torch.load(run_dir / method / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    batches = int(ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"])
    config = _config(method, run_dir, config_dir)
    devices = config.get("trainer", {}).get("devices", 1)
    devices = devices if isinstance(devices, int) and devices > 0 else 1
    prompts = batches * int(config["data"]["init_args"]["batch_size"]) * devices
    init = config["model"]["init_args"]
    if method == "dpo":
        samples = 0  # no sampling: DPO learns from the fixed rankings
    else:
        algorithm = init.get("algorithm") or {}  # the estimator form, or class_path + init_args
        samples = prompts * int((algorithm.get("init_args") or algorithm).get("group_size", 1))
    return Budget(batches, prompts, samples, int(ckpt["global_step"]), seconds)


def plot_method(run_dir: Path, method: str, out: Path) -> Path:
    """``out/<method>.png``: the training curves of one method (RM and gold score, KL, β; DPO: its losses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lit_rlhf.quickstart.report import plot_series, read_metrics, save_figure

    series = read_metrics(run_dir / method / "logs")
    name = method.upper()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    if method == "dpo":
        panels = [
            (["train/loss"], f"{name}: loss", "nats"),
            (["rewards/accuracies", "train/rewards/accuracies"], f"{name}: implicit reward accuracy", "accuracy"),
            (["rewards/margins", "train/rewards/margins"], f"{name}: implicit reward margin", "β · log ratio"),
            (["rewards/chosen", "rewards/rejected"], f"{name}: implicit rewards", "β · log ratio"),
        ]
    else:
        panels = [
            (["objective/score"], f"{name} (PPO iteration): reward-model score", "normalised RM score"),
            (["gold/score"], f"{name} (PPO iteration): gold judge (VADER)", "VADER compound"),
            (["objective/kl"], f"{name} (PPO iteration): KL to the SFT policy", "nats / response"),
            (["objective/entropy"], f"{name} (PPO iteration): entropy", "nats / token"),
        ]
    for ax, (keys, title, ylabel) in zip(axes.flat, panels, strict=True):
        plot_series(ax, series, keys, title, ylabel)
    return save_figure(fig, out / f"{method}.png")


def plot_comparison(results: dict[str, dict], out: Path) -> Path:
    """``out/compare.png``: gold-judge gain over SFT, win rate, KL to SFT and unknown-word rate per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lit_rlhf.quickstart.report import save_figure

    methods = list(results)
    panels = [
        ("gold_gain", "gold judge: method − SFT (target ≥ 0.3)", 0.3),
        ("gold_win_rate", "win rate over SFT, VADER (target ≥ 0.7)", 0.7),
        ("kl", "KL to SFT, nats / response (target ≤ 10)", 10.0),
        ("unknown_word_rate", "unknown-word rate (SFT: dashed)", results[methods[0]]["sft_unknown_word_rate"]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for ax, (key, title, line) in zip(axes, panels, strict=True):
        values = [results[m].get(key, float("nan")) for m in methods]
        ax.bar([m.upper() for m in methods], values, color=[f"C{i % 10}" for i in range(len(methods))])
        ax.axhline(line, color="grey", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, out / "compare.png")


def summarize(evaluation, vocabulary: set[str]) -> dict[str, float]:
    """Headline numbers of one method's held-out evaluation, with both policies' unknown-word rates."""
    s = evaluation.summary
    return {
        "gold": s["fn_score"],
        "sft_gold": s["baseline/fn_score"],
        "gold_gain": s["fn_score"] - s["baseline/fn_score"],
        "gold_win_rate": s["win_rate/fn_score"],
        "rm": s.get("rm_score", float("nan")),
        "kl": s["kl_to_reference"],
        "length": s["response_length"],
        "eos_rate": s["eos_rate"],
        "unknown_word_rate": unknown_word_rate((r["policy_response"] for r in evaluation.rows), vocabulary),
        "sft_unknown_word_rate": unknown_word_rate((r["baseline_response"] for r in evaluation.rows), vocabulary),
    }


def write_comparison_report(
    run_dir: Path,
    results: dict[str, dict],
    budgets: dict[str, Budget],
    samples: dict[str, list[dict]],
    machine: str,
    timings: dict[str, float],
    rows_shown: int = 6,
) -> Path:
    """Write ``run_dir/report/compare.md`` with the table, the plots and a few samples per method."""
    from lit_rlhf.quickstart.report import TARGETS

    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots = [plot_comparison(results, out)] + [plot_method(run_dir, m, out) for m in results]
    first = next(iter(results.values()))
    lines = [
        "# lit_rlhf quickstart: PPO vs critic-free RL" + (" vs DPO" if "dpo" in results else ""),
        "",
        f"Machine: {machine}. Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".",
        "Every method starts from the same SFT export and, for the RL methods, scores with the same reward model; "
        "all are evaluated on the same held-out prompts (4 samples each, the same seed) against the same SFT "
        "samples. The gold judge is VADER, never seen in training.",
        "",
        "| | SFT | " + " | ".join(m.upper() for m in results) + " |",
        "|---|---|" + "---|" * len(results),
        f"| gold judge (mean VADER compound) | {first['sft_gold']:.3f} | "
        + " | ".join(f"{r['gold']:.3f} ({r['gold_gain']:+.3f})" for r in results.values())
        + " |",
        "| win rate over SFT (VADER) | | " + " | ".join(f"{r['gold_win_rate']:.0%}" for r in results.values()) + " |",
        "| KL to SFT (nats / response) | 0 | " + " | ".join(f"{r['kl']:.2f}" for r in results.values()) + " |",
        f"| unknown-word rate (degenerate text) | {first['sft_unknown_word_rate']:.1%} | "
        + " | ".join(f"{r['unknown_word_rate']:.1%}" for r in results.values())
        + " |",
        "| reward model (normalised) | | " + " | ".join(f"{r['rm']:.2f}" for r in results.values()) + " |",
        "| response length (tokens) / EOS rate | | "
        + " | ".join(f"{r['length']:.1f} / {r['eos_rate']:.2f}" for r in results.values())
        + " |",
        "| training batches × prompts / batch | | "
        + " | ".join(f"{b.batches} × {b.prompts // max(b.batches, 1)}" for b in (budgets[m] for m in results))
        + " |",
        "| prompts seen / responses sampled | | "
        + " | ".join(f"{b.prompts} / {b.samples}" for b in (budgets[m] for m in results))
        + " |",
        "| optimizer steps | | " + " | ".join(str(budgets[m].optimizer_steps) for m in results) + " |",
        "| training wall time | | " + " | ".join(f"{budgets[m].seconds:.0f} s" for m in results) + " |",
        "",
        "Targets (RL methods): gold gain ≥ "
        f"{TARGETS['gold_gain'][1]}, win rate ≥ {TARGETS['gold_win_rate'][1]:.0%}, KL ≤ {TARGETS['kl'][1]:g} nats; "
        "DPO: beats SFT under the gold judge. "
        + "; ".join(f"{m.upper()}: {'met' if meets_targets(m, r) else '**missed**'}" for m, r in results.items())
        + ". Degenerate text near SFT's (unknown-word rate at most 0.5 points above it): "
        + "; ".join(f"{m.upper()}: {'yes' if keeps_sft_words(r) else '**no**'}" for m, r in results.items())
        + ".",
        "The unknown-word rate is the share of response words that never occur in the task's demonstrations "
        "(invented or broken words such as 'fantasterfeculeasant' that a policy finds the reward model overrates).",
        "",
        *(f"![{p.stem}]({p.name})" for p in plots),
        "",
        "## Samples (held-out prompts)",
        "",
        "| method | prompt | response | VADER / RM |",
        "|---|---|---|---|",
    ]
    for method, rows in samples.items():
        for row in rows[:rows_shown]:
            gold, rm = row["policy_fn_score"], row.get("policy_rm_score", float("nan"))
            lines.append(f"| {method.upper()} | {row['prompt']} | {row['policy_response']} | {gold:.2f} / {rm:.2f} |")
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def meets_targets(method: str, result: dict) -> bool:
    """The issue's bar: DPO must beat SFT under the gold judge; the RL methods meet PPO's three targets."""
    from lit_rlhf.quickstart.report import TARGETS

    if method == "dpo":
        return result["gold_gain"] > 0
    return (
        result["gold_gain"] >= TARGETS["gold_gain"][1]
        and result["gold_win_rate"] >= TARGETS["gold_win_rate"][1]
        and result["kl"] <= TARGETS["kl"][1]
    )


def keeps_sft_words(result: dict) -> bool:
    """Degenerate text near SFT's: the unknown-word rate at most half a percentage point above SFT's."""
    from lit_rlhf.quickstart.report import TARGETS

    return result["unknown_word_rate"] - result["sft_unknown_word_rate"] <= TARGETS["unknown_word_gap"][1]


def write_results_csv(path: Path, results: dict[str, dict], budgets: dict[str, Budget]) -> None:
    """One row per method: the numbers of the table, for scripts."""
    keys = sorted({k for r in results.values() for k in r})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *keys, "batches", "prompts", "samples", "optimizer_steps", "seconds"])
        for method, r in results.items():
            b = budgets[method]
            writer.writerow(
                [method, *(r.get(k, "") for k in keys), b.batches, b.prompts, b.samples, b.optimizer_steps, b.seconds]
            )
