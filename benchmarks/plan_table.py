"""The README's table of PPO setups for a Llama-3-8B-shaped model on a 24 GB GPU, computed by the planner.

python -m benchmarks.plan_table            # prints the Markdown table (reads only config.json files)
"""

from __future__ import annotations

from lit_rlhf.plan import _read_config, format_bytes, parse_size, run_from_config

DEVICE = parse_size("24GiB")
EXAMPLE = "configs/examples/ppo-qlora.yaml"
EIGHT_B = "docs/data/llama3-8b"
ROWS = [
    ("four models, bf16 (full policy and critic)", ["--config", "configs/plan/llama3-8b-ppo-four-models.yaml"], False),
    (
        "four models, QLoRA policy and critic, 4-bit RM (`ppo-qlora.yaml`)",
        [
            "--config",
            EXAMPLE,
            *(f"--model.init_args.{role}.name_or_path={EIGHT_B}" for role in ("policy", "critic", "reward_model")),
        ],
        False,
    ),
    ("LoRA + value head, bf16 base", ["--config", "configs/plan/llama3-8b-ppo-lora-value-head.yaml"], False),
    ("LoRA + value head, 4-bit base and RM", ["--config", "configs/plan/llama3-8b-ppo-qlora-value-head.yaml"], False),
    ("shared 4-bit base (`--shared_base`)", ["--config", "configs/plan/llama3-8b-ppo-qlora-value-head.yaml"], True),
]


def main() -> None:
    print("| setup | weights | adapters + grads + optimizer | activations + logits | KV cache | peak (phase) | 24 GB |")
    print("|---|---|---|---|---|---|---|")
    for name, args, shared in ROWS:
        config, module, data = _read_config(args)
        run, _ = run_from_config(config, module, data, "cuda", shared, 2)
        plan = run.plan()
        weights = sum(r.weights for r in plan.roles)
        states = sum(r.adapters + r.gradients + r.optimizer for r in plan.roles)
        acts = sum(r.activations + r.logits for r in plan.roles)
        verdict = "fits" if plan.fits(DEVICE) else "no"
        print(
            f"| {name} | {format_bytes(weights)} | {format_bytes(states)} | {format_bytes(acts)} | "
            f"{format_bytes(plan.kv_cache)} | {format_bytes(plan.peak)} ({plan.peak_phase}) | {verdict} |"
        )


if __name__ == "__main__":
    main()
