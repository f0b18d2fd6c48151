"""The quickstart's report: a markdown page and PNG plots in the run folder, from the stages' CSV logs and the
held-out evaluation (``lit_rlhf.evaluation``)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

#: the issue's bar for "alignment worked" on the quickstart task
TARGETS = {
    "rm_accuracy": (">=", 0.85, "RM held-out pairwise accuracy vs the gold order"),
    "gold_gain": (">=", 0.30, "mean VADER compound, PPO minus SFT"),
    "gold_win_rate": (">=", 0.70, "win rate of PPO over SFT under VADER"),
    "kl": ("<=", 10.0, "KL(PPO || SFT), nats per response"),
    # degenerate text: invented or broken words the RM overrates (lit_rlhf.quickstart.compare); 0.005 = half a
    # percentage point of the response words above SFT's own rate
    "unknown_word_gap": ("<=", 0.005, "unknown-word rate, PPO minus SFT (share of response words)"),
}


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``metric -> [(step, value), ...]`` from every ``metrics.csv`` under ``run_dir``."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for path in sorted(Path(run_dir).rglob("metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                step = int(float(row.get("step") or 0))
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in ("", None):
                        series[key].append((step, float(value)))
    return dict(series)


def plot_series(ax, series: dict, keys: list[str], title: str, ylabel: str) -> None:
    """Draw the metrics ``keys`` of ``series`` (from :func:`read_metrics`) on the axes ``ax``, those it has."""
    for key in keys:
        if key in series:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if len(steps) < 5 else None, label=key)
    ax.set_title(title)
    ax.set_xlabel("optimizer step" if "ppo" not in title.lower() else "PPO iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def make_plots(run_dir: Path) -> list[Path]:
    """Write ``sft.png``, ``rm.png`` and ``ppo.png`` under ``run_dir/report``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    sft, rm, ppo = (read_metrics(run_dir / stage / "logs") for stage in ("sft", "rm", "ppo"))

    fig, ax = plt.subplots(figsize=(6, 4))
    plot_series(ax, sft, ["train/loss", "val/loss"], "SFT: loss on completion tokens", "nats / token")
    paths.append(save_figure(fig, out / "sft.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    plot_series(ax, rm, ["train/accuracy", "val/accuracy"], "RM: pairwise accuracy", "accuracy")
    paths.append(save_figure(fig, out / "rm.png"))

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    plot_series(axes[0, 0], ppo, ["objective/score"], "PPO: reward-model score", "normalised RM score")
    plot_series(axes[0, 1], ppo, ["gold/score"], "PPO: gold judge (VADER) of the rollouts", "VADER compound")
    plot_series(axes[1, 0], ppo, ["objective/kl"], "PPO: KL to the SFT policy", "nats / response")
    plot_series(axes[1, 1], ppo, ["objective/beta"], "PPO: KL coefficient β", "β")
    paths.append(save_figure(fig, out / "ppo.png"))
    return paths


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` (a PNG) and close it; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def headline(
    summary: dict[str, float], rm_accuracy: float | None, unknown_words: tuple[float, float] | None = None
) -> dict[str, float]:
    """The numbers the targets are about; ``unknown_words`` = (policy's, SFT's) unknown-word rates."""
    numbers = {
        "gold_gain": summary["fn_score"] - summary["baseline/fn_score"],
        "gold_win_rate": summary["win_rate/fn_score"],
        "kl": summary["kl_to_reference"],
    }
    if rm_accuracy is not None:
        numbers["rm_accuracy"] = rm_accuracy
    if unknown_words is not None:
        numbers["unknown_word_gap"] = unknown_words[0] - unknown_words[1]
    return numbers


def check_targets(numbers: dict[str, float]) -> list[tuple[str, float, bool]]:
    rows = []
    for key, (op, bound, label) in TARGETS.items():
        if key in numbers:
            value = numbers[key]
            rows.append((f"{label} {op} {bound}", value, value >= bound if op == ">=" else value <= bound))
    return rows


def write_report(
    run_dir: Path,
    evaluation,
    timings: dict[str, float],
    machine: str,
    rows_shown: int = 12,
    unknown_words: tuple[float, float] | None = None,
) -> Path:
    """Write ``run_dir/report/report.md`` and the plots; return the page's path. ``unknown_words``: the PPO and
    SFT responses' unknown-word rates (degenerate text)."""
    run_dir = Path(run_dir)
    plots = make_plots(run_dir)
    rm_val = read_metrics(run_dir / "rm" / "logs").get("val/accuracy")
    sft_val = read_metrics(run_dir / "sft" / "logs").get("val/loss")
    s = evaluation.summary
    numbers = headline(s, rm_val[-1][1] if rm_val else None, unknown_words)
    lines = [
        "# lit_rlhf quickstart report",
        "",
        f"Machine: {machine}. Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {value:.3f} | {'yes' if ok else '**no**'} |" for label, value, ok in check_targets(numbers)]
    lines += [
        "",
        "## Held-out evaluation",
        "",
        f"{len(evaluation.rows)} responses to held-out prompts (never seen in training) per policy.",
        "",
        "| | SFT | PPO |",
        "|---|---|---|",
        f"| gold judge (VADER compound) | {s['baseline/fn_score']:.3f} | {s['fn_score']:.3f} |",
        f"| reward model (normalised) | {s['baseline/rm_score']:.3f} | {s['rm_score']:.3f} |",
        f"| response length (tokens) | {s['baseline/response_length']:.1f} | {s['response_length']:.1f} |",
        f"| EOS rate | {s['baseline/eos_rate']:.2f} | {s['eos_rate']:.2f} |",
        f"| KL to SFT (nats / response) | 0 | {s['kl_to_reference']:.2f} |",
        f"| win rate over SFT (VADER / RM) | | {s['win_rate/fn_score']:.2f} / {s['win_rate/rm_score']:.2f} |",
    ]
    if unknown_words is not None:
        lines.append(
            f"| words never in the demonstrations (degenerate text) | {unknown_words[1]:.1%} | {unknown_words[0]:.1%} |"
        )
    lines += [
        "",
    ]
    if sft_val:
        lines += [f"SFT final validation loss: {sft_val[-1][1]:.3f} nats/token.", ""]
    lines += (
        ["## Curves", ""]
        + [f"![{p.stem}]({p.name})" for p in plots]
        + [
            "",
            "## Samples",
            "",
            "| prompt | SFT response | VADER / RM | PPO response | VADER / RM |",
            "|---|---|---|---|---|",
        ]
    )
    for row in evaluation.rows[:rows_shown]:
        lines.append(
            f"| {row['prompt']} | {row['baseline_response']} | {row['baseline_fn_score']:.2f} / "
            f"{row['baseline_rm_score']:.2f} | {row['policy_response']} | {row['policy_fn_score']:.2f} / "
            f"{row['policy_rm_score']:.2f} |"
        )
    path = run_dir / "report" / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- iterated RLHF (lit_rlhf.iterate): one row and one curve segment per round -------------------------------
ROUND_CURVES = (
    ("objective/score", "PPO: RM score (each round's own RM)", "normalised RM score"),
    ("gold/score", "PPO: gold judge (VADER) of the rollouts", "VADER compound"),
    ("objective/kl", "PPO: KL to the SFT policy", "nats / response"),
)


def plot_rounds(run_dir: Path, summaries: list[dict]) -> Path:
    """``report/rounds.png``: the PPO curves of all rounds end to end (dashed lines at round starts) and the
    held-out gold score, RM score in gold units and their gap per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title, ylabel) in zip(axes.flat, ROUND_CURVES):
        offset = 0
        for s in summaries:
            points = read_metrics(run_dir / f"round_{s['round']}" / "ppo" / "logs").get(key, [])
            if points:
                steps, values = zip(*points)
                ax.plot([offset + x for x in steps], values, label=f"round {s['round']}")
                ax.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
                offset += max(steps) + 1
        ax.set(title=title, xlabel="PPO iteration (all rounds)", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax, rounds = axes[1, 1], [s["round"] for s in summaries]
    for key, label in (("fn_score", "gold (VADER)"), ("rm_as_gold", "RM score in gold units"), ("rm_gold_gap", "gap")):
        ax.plot(rounds, [s[key] for s in summaries], marker="o", label=label)
    ax.set(title="Held-out, after each round", xlabel="round", ylabel="VADER compound", xticks=rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out / "rounds.png")


def write_rounds_report(run_dir: Path, summaries: list[dict]) -> Path:
    """Write ``run_dir/report/report.md`` comparing the rounds of an iterated run; return its path."""
    run_dir = Path(run_dir)
    plot = plot_rounds(run_dir, summaries)
    lines = [
        "# lit_rlhf iterated RLHF report",
        "",
        "Held-out prompts; the RM score is mapped to gold units by the line fitted on the SFT samples, and the "
        "gap (RM in gold units minus gold) is how much the policy exploits its RM.",
        "",
        "| round | comparisons | RM val acc. | gold: SFT → policy | win rate vs SFT | RM (norm.) | RM in gold units "
        "| RM − gold gap | KL to SFT | time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        accuracy = read_metrics(run_dir / f"round_{s['round']}" / "rm" / "logs").get("val/accuracy")
        lines.append(
            f"| {s['round']} | {s['comparisons']} | {accuracy[-1][1] if accuracy else float('nan'):.3f} "
            f"| {s['baseline/fn_score']:.3f} → {s['fn_score']:.3f} | {s['win_rate/fn_score']:.2f} "
            f"| {s['rm_score']:.2f} | {s['rm_as_gold']:.3f} | {s['rm_gold_gap']:+.3f} "
            f"| {s['kl_to_reference']:.2f} | {s['seconds']:.0f} s |"
        )
    lines += ["", f"![{plot.stem}]({plot.name})", ""]
    path = run_dir / "report" / "report.md"
    path.write_text("\n".join(lines))
    return path
