"""``python -m benchmarks [--preset cpu|gpu] [--cases sft rm ppo dpo] [--repeats 3]``.

Every (case, variant, repetition) runs in a fresh subprocess so peak memory is its own; the table reports the
median and the spread (min–max) of the repetitions and the ratio lit_rlhf / floor of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from benchmarks.common import PRESETS


def registry() -> dict:
    from benchmarks import sft

    cases = dict(sft.CASES)
    for name in ("rm", "ppo", "dpo", "grpo", "ppo_memory"):
        try:
            module = __import__(f"benchmarks.{name}", fromlist=["CASES"])
        except ImportError:
            continue
        cases.update(module.CASES)
    return cases


def run_one(case: str, variant: str, preset: str) -> dict[str, float]:
    code = (
        f"import json; from benchmarks.__main__ import registry; "
        f"print('RESULT', json.dumps(registry()[{case!r}][{variant!r}]({preset!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{case}/{variant} failed:\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def summarise(results: list[dict[str, float]]) -> dict[str, tuple[float, float, float]]:
    return {
        k: (statistics.median(r[k] for r in results), min(r[k] for r in results), max(r[k] for r in results))
        for k in results[0]
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--cases", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write all results to this file")
    args = parser.parse_args(argv)
    cases = registry()
    selected = args.cases or list(cases)
    report = {}
    for case in selected:
        report[case] = {}
        for variant in cases[case]:
            runs = [run_one(case, variant, args.preset) for _ in range(args.repeats)]
            report[case][variant] = summarise(runs)
            shown = "  ".join(f"{k}={m:.4g} [{lo:.4g}–{hi:.4g}]" for k, (m, lo, hi) in report[case][variant].items())
            print(f"{case:>14} {variant:<16} {shown}", flush=True)
        if "floor" in report[case]:
            floor = report[case]["floor"]
            for variant, stats in report[case].items():
                if variant == "floor":
                    continue
                ratios = []
                for key, (median, _, _) in stats.items():
                    if key not in floor or floor[key][0] == 0 or key == "peak_mib":
                        continue
                    # time ratio: lit_rlhf time / floor time (throughputs are inverted)
                    ratio = floor[key][0] / median if key.endswith("_per_s") else median / floor[key][0]
                    ratios.append(f"{key} {ratio:.3f}")
                print(f"{case:>14} {variant} / floor: " + ", ".join(ratios), flush=True)
        if "four_model" in report[case]:  # memory and time of each PPO setup relative to the four-model one
            base = report[case]["four_model"]
            for variant, stats in report[case].items():
                if variant in ("four_model", "floor"):
                    continue
                ratios = [f"{k} {stats[k][0] / base[k][0]:.3f}" for k in ("peak_mib", "seconds_per_iteration")]
                print(f"{case:>14} {variant} / four_model: " + ", ".join(ratios), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
