"""PPO beside TRL's ``PPOTrainer``: seconds per PPO update at identical settings, measured side by side in one run.

``python -m benchmarks.ppo_vs_trl [--presets cpu mid] [--iterations 5] [--json out.json]`` (needs ``trl``, which
lit_rlhf does not depend on: it is not one of ``python -m benchmarks``' cases; without it this prints why and exits
0). Both sides run the same workload on the same random-init Llama folders (``benchmarks.common.PRESETS``: ``cpu``
~4M parameters, ``mid`` 113M), the **full four-model setup** (trainable policy, frozen reference copy, trainable
critic initialised from the reward-model export, frozen reward model), fp32, ``torch.set_num_threads(2)``:

* 16 prompts per update (the same rows in the same order on both sides), up to 16 new tokens sampled at
  temperature 1, top-k 0, top-p 1; both stop a response at its first EOS (TRL: ``stop_token="eos"``) and run
  ``generate`` until every row has stopped or 16 tokens;
* scoring in one chunk of 16 rows; 1 PPO epoch, 1 minibatch of 16 rows in 2 micro-batches of 8, one optimizer
  step; fused AdamW (TRL's default ``adamw_torch_fused``), learning rate 1e-5, no weight decay; no gradient-norm
  clipping (TRL's loop has none); KL coefficient 0.05 (k1), vf_coef 0.1, clip ranges 0.2 / 0.2, γ 1, λ 0.95.

Each side runs in its own subprocess (its own allocator, no shared state) that stops at the end of every update
and waits for the driver: the driver lets them run one update at a time, alternately (ABAB...), so machine load
hits both alike. A side's update time is the wall time from its go to the end of its update (ours: Lightning's
``on_train_batch_end``; TRL: the ``on_step_end`` callback), so it holds everything its loop does between two
updates. After ``--warmup`` untimed updates each, medians and the spread over ``--iterations`` timed ones, of the
wall time and of the process's CPU time (steadier on a loaded machine), and each side's peak RSS.
``--ours-ppo FIELD=JSON ...`` adds a third side, ours with those ``PPOConfig`` fields changed.

Phases, timed from outside:

* ours: ``PPOModule.generate`` (generation), ``_rollout_forwards`` (scoring; inside it ``policy_forward``, the
  reference's ``policy_forward(reference=True)``, ``values``, ``RewardScorer.score_rollout``) and ``ppo_update``
  (optimisation), wrapped on the instance;
* TRL: ``batch_generation`` (generation: ``generate`` with ``output_scores``), from its end to the first forward of
  the policy-and-value wrapper (scoring: inside it the log-probs from ``generate``'s scores, the reference
  ``forward``, ``get_reward`` of the value and of the reward model; also rewards and GAE), and from there to
  ``on_step_end`` (optimisation, with its statistics); module functions of ``trl.experimental.ppo.ppo_trainer``
  replaced by timed ones in TRL's subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS, NEW_TOKENS, MICRO_BATCH = 16, 16, 8
LR, KL_COEF, VF_COEF, CLIP, VALUE_CLIP, GAMMA, LAM = 1e-5, 0.05, 0.1, 0.2, 0.2, 1.0, 0.95
THREADS = int(os.environ.get("PPO_VS_TRL_THREADS", "2"))  # torch threads of each side (--threads)
PHASES = ("generation", "scoring", "optimisation")
SCORING = ("policy", "reference", "values", "reward")
TAG = "@@ "  # protocol lines on a child's stdout; everything else a library prints is ignored


# ---- protocol ---------------------------------------------------------------------------------------------
class Baton:
    """A child's side of the driver's turn-taking: report an update, then wait for the next go."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.started = self.cpu_started = 0.0

    def wait(self) -> None:
        line = sys.stdin.readline()
        if line.strip() != "go":  # the driver is done with this side (or gone): leave at once, from any loop
            sys.stdout.flush()
            os._exit(0)
        self.phases = {}
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def report(self, extra: dict | None = None) -> None:
        out = {
            "seconds_per_update": time.perf_counter() - self.started,
            "cpu_seconds_per_update": time.process_time() - self.cpu_started,
            # the process's peak RSS so far (models, optimizer states, the largest phase's activations)
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **self.phases,
            **(extra or {}),
        }
        print(TAG + json.dumps(out), flush=True)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def timed(self, fn, name: str):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t0)

        return wrapper


def prompt_rows(preset: str, updates: int) -> list[list[int]]:
    """The prompts (token ids, no padding) of the first ``updates`` batches our run sees, in order."""
    from benchmarks.common import base_model_dir, data_dir
    from lit_rlhf import ModelSpec
    from lit_rlhf.datamodules import PromptDataModule
    from lit_rlhf.hf.loading import load_tokenizer

    dm = PromptDataModule(str(data_dir() / "prompts" / "train.jsonl"), batch_size=PROMPTS)
    dm.tokenizer = load_tokenizer(ModelSpec(str(base_model_dir(preset))))
    dm.setup("fit")
    rows, loader = [], iter(dm.train_dataloader())
    for _ in range(updates):
        batch = next(loader)
        for ids, mask in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"], strict=True):
            rows.append(ids[mask.bool()].tolist())
    return rows


# ---- ours -------------------------------------------------------------------------------------------------
def child_ours(preset: str, updates: int, ppo_overrides: dict | None = None) -> None:
    import lightning as L
    import torch

    from benchmarks.common import base_model_dir, bench_trainer, data_dir
    from benchmarks.ppo import rm_dir
    from lit_rlhf import ModelSpec
    from lit_rlhf.datamodules import PromptDataModule
    from lit_rlhf.hf.reward import RewardScorer
    from lit_rlhf.models.ppo import KLConfig, PPOConfig, PPOModule, SamplingConfig

    torch.set_num_threads(THREADS)
    base, rm = str(base_model_dir(preset)), str(rm_dir(preset))
    baton = Baton()
    module = PPOModule(
        policy=ModelSpec(base),
        critic=ModelSpec(rm),
        reward_model=ModelSpec(rm),
        sampling=SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0),
        ppo=PPOConfig(
            ppo_epochs=1,
            num_mini_batches=1,
            micro_batch_size=MICRO_BATCH,
            forward_batch_size=PROMPTS,
            vf_coef=VF_COEF,
            clip_range=CLIP,
            value_clip_range=VALUE_CLIP,
            gamma=GAMMA,
            lam=LAM,
            **(ppo_overrides or {}),
        ),
        kl=KLConfig(coef=KL_COEF),
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True),
        max_grad_norm=None,
    )
    scoring = {"active": False}

    def in_scoring(fn, name):
        timed = baton.timed(fn, name)
        return lambda *a, **k: (timed if scoring["active"] else fn)(*a, **k)

    module.generate = baton.timed(module.generate, "generation")
    rollout_forwards = baton.timed(module._rollout_forwards, "scoring")

    def timed_rollout_forwards(*args, **kwargs):
        scoring["active"] = True
        try:
            return rollout_forwards(*args, **kwargs)
        finally:
            scoring["active"] = False

    module._rollout_forwards = timed_rollout_forwards
    module.ppo_update = baton.timed(module.ppo_update, "optimisation")
    policy_forward = module.policy_forward
    policy_pass = in_scoring(lambda *a, **k: policy_forward(*a, **k), "scoring_policy")
    reference_pass = in_scoring(lambda *a, **k: policy_forward(*a, **k), "scoring_reference")
    module.policy_forward = lambda *a, reference=False, **k: (reference_pass if reference else policy_pass)(
        *a, reference=reference, **k
    )
    module.values = in_scoring(module.values, "scoring_values")
    RewardScorer.score_rollout = in_scoring(RewardScorer.score_rollout, "scoring_reward")

    class Turns(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            print(TAG + "ready", flush=True)
            baton.wait()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            baton.report()
            baton.wait()

    data = PromptDataModule(str(data_dir() / "prompts" / "train.jsonl"), batch_size=PROMPTS)
    bench_trainer([Turns()], max_epochs=1, limit_train_batches=updates).fit(module, datamodule=data)


# ---- TRL --------------------------------------------------------------------------------------------------
def child_trl(preset: str, updates: int) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import trl.experimental.ppo.ppo_trainer as T
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from benchmarks.common import base_model_dir
    from benchmarks.ppo import rm_dir
    from lit_rlhf import ModelSpec
    from lit_rlhf.hf.loading import load_tokenizer

    torch.set_num_threads(THREADS)
    base, rm = str(base_model_dir(preset)), str(rm_dir(preset))
    tok = load_tokenizer(ModelSpec(base))  # the tokenizer our side uses (it has a pad token distinct from EOS)
    tok.padding_side = "left"
    fp32 = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(base, **fp32)
    reference = AutoModelForCausalLM.from_pretrained(base, **fp32)
    value_model = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1, **fp32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1, **fp32)
    rows = prompt_rows(preset, updates)
    dataset = Dataset.from_dict({"input_ids": rows})
    output_dir = tempfile.mkdtemp(prefix="ppo_vs_trl-")
    args = PPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=PROMPTS // MICRO_BATCH,
        num_mini_batches=1,
        num_ppo_epochs=1,
        local_rollout_forward_batch_size=PROMPTS,
        total_episodes=PROMPTS * updates,
        response_length=NEW_TOKENS,
        temperature=1.0,
        stop_token="eos",
        missing_eos_penalty=None,
        learning_rate=LR,
        weight_decay=0.0,
        optim="adamw_torch_fused",
        kl_coef=KL_COEF,
        kl_estimator="k1",
        vf_coef=VF_COEF,
        cliprange=CLIP,
        cliprange_value=VALUE_CLIP,
        gamma=GAMMA,
        lam=LAM,
        bf16=False,
        fp16=False,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    baton = Baton()

    class Turns(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            print(TAG + "ready", flush=True)
            baton.wait()

        def on_step_end(self, args, state, control, **kwargs):
            started = stamps.get("scored")
            if started is not None:
                baton.add("optimisation", time.perf_counter() - started)
            baton.report()
            stamps.clear()
            baton.wait()

    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        train_dataset=dataset,
        value_model=value_model,
        callbacks=[Turns()],
    )
    # the same rows in the same order as our run (TRL's own loader shuffles)
    loader = DataLoader(dataset, batch_size=PROMPTS, shuffle=False, collate_fn=DataCollatorWithPadding(tok))
    trainer.dataloader = trainer.accelerator.prepare(loader)

    stamps: dict[str, float] = {}
    generation, forward, get_reward, log_softmax = (
        T.batch_generation,
        T.forward,
        T.get_reward,
        T.selective_log_softmax,
    )
    calls = {"log_softmax": 0}

    def timed_generation(*args, **kwargs):
        t0 = time.perf_counter()
        out = generation(*args, **kwargs)
        stamps["generated"] = time.perf_counter()
        baton.add("generation", stamps["generated"] - t0)
        calls["log_softmax"] = 0
        return out

    def timed_forward(model, *args, **kwargs):
        if isinstance(model, T.PolicyAndValueWrapper):  # the update's forwards
            if "scored" not in stamps:
                stamps["scored"] = time.perf_counter()
                baton.add("scoring", stamps["scored"] - stamps["generated"])
            return forward(model, *args, **kwargs)
        return baton.timed(forward, "scoring_reference")(model, *args, **kwargs)

    def timed_get_reward(model, *args, **kwargs):
        name = "scoring_values" if model is value_model else "scoring_reward"
        return baton.timed(get_reward, name)(model, *args, **kwargs)

    def timed_log_softmax(*args, **kwargs):
        if "generated" not in stamps or "scored" in stamps:
            return log_softmax(*args, **kwargs)
        # in scoring: the 1st, 3rd... call takes the behaviour log-probs from generate's scores, the others the
        # reference's (whose forward is timed on its own)
        calls["log_softmax"] += 1
        name = "scoring_policy" if calls["log_softmax"] % 2 else "scoring_reference"
        return baton.timed(log_softmax, name)(*args, **kwargs)

    T.batch_generation, T.forward, T.get_reward, T.selective_log_softmax = (
        timed_generation,
        timed_forward,
        timed_get_reward,
        timed_log_softmax,
    )
    trainer.train()


# ---- driver -----------------------------------------------------------------------------------------------
class Side:
    """A child process driven one update at a time."""

    def __init__(self, name: str, preset: str, updates: int, log: Path, threads: int, extra: list[str]) -> None:
        self.name = name
        threads = str(threads)
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PPO_VS_TRL_THREADS=threads)
        env["TOKENIZERS_PARALLELISM"] = "false"
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        self.log = open(log, "w")  # noqa: SIM115  (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.ppo_vs_trl", "--child", name.rstrip("+"), "--presets", preset]
            + ["--updates", str(updates), *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )

    def read(self) -> str:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return line[len(TAG) :].strip()
        raise RuntimeError(f"{self.name} stopped (rc {self.proc.wait()}); see {self.log.name}")

    def update(self) -> dict[str, float]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self.read())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def run_preset(
    preset: str, warmup: int, iterations: int, logdir: Path, threads: int, ours_ppo: list[str], names: list[str]
) -> dict:
    from benchmarks.common import base_model_dir, data_dir
    from benchmarks.ppo import rm_dir

    base_model_dir(preset), rm_dir(preset), data_dir()  # build once, before two processes race for it
    updates = warmup + iterations
    extra = {"ours+": ["--ours-ppo", *ours_ppo]}
    logs = {name: logdir / f"ppo_vs_trl-{preset}-{name}.log" for name in names}
    sides = {name: Side(name, preset, updates, log, threads, extra.get(name, [])) for name, log in logs.items()}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    try:
        for side in sides.values():
            if side.read() != "ready":
                raise RuntimeError(f"{side.name}: unexpected start")
        for i in range(updates):
            for name, side in sides.items():  # A then B (then C) in every round
                out = side.update()
                print(f"[{preset}] update {i} {name}: {out['seconds_per_update']:.3f} s", flush=True)
                if i >= warmup:
                    results[name].append(out)
    finally:
        for side in sides.values():
            side.close()
    return summarise(results)


def summarise(results: dict[str, list[dict]]) -> dict:
    keys = ["seconds_per_update", "cpu_seconds_per_update", *PHASES, *(f"scoring_{s}" for s in SCORING)]
    keys += ["peak_rss_mib"] if "peak_rss_mib" in next(iter(results.values()))[0] else []
    out = {}
    for name, runs in results.items():
        out[name] = {}
        for key in keys:
            values = [r.get(key, 0.0) for r in runs]
            out[name][key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        other = [r["seconds_per_update"] - sum(r.get(p, 0.0) for p in PHASES) for r in runs]
        out[name]["other"] = {"median": statistics.median(other), "min": min(other), "max": max(other)}
        out[name]["runs"] = runs
    for name in results:  # per round: the updates ran back to back
        if name == "trl" or "trl" not in results:
            continue
        for key in ("seconds_per_update", "cpu_seconds_per_update"):
            ratios = [o[key] / t[key] for o, t in zip(results[name], results["trl"])]
            out[f"{name}/trl {key}"] = [statistics.median(ratios), min(ratios), max(ratios)]
    return out


def print_table(preset: str, summary: dict) -> None:
    names = [n for n in ("ours", "trl", "ours+") if n in summary]
    base = "trl" if "trl" in summary else names[-1]
    print(f"\n== {preset}: seconds per PPO update, median [min-max] ==")
    print(f"{'figure':<22}" + "".join(f"{n:>26}" for n in names) + f"{'ours/' + base:>10}")
    cell = lambda s: f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"  # noqa: E731
    figures = ("seconds_per_update", "cpu_seconds_per_update", *PHASES, *(f"scoring_{s}" for s in SCORING))
    for key in (*figures, "other", "peak_rss_mib"):
        if key not in summary["ours"]:
            continue
        o, t = summary["ours"][key], summary[base][key]
        ratio = o["median"] / t["median"] if t["median"] else float("nan")
        print(f"{key:<22}" + "".join(f"{cell(summary[n][key]):>26}" for n in names) + f"{ratio:>10.3f}")
    for key, value in summary.items():
        if "/trl" in key:
            median, lo, hi = value
            print(f"per-round ratio {key}: median {median:.3f} [{lo:.3f}-{hi:.3f}]")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ppo_vs_trl", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["cpu", "mid"])
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates per side first")
    parser.add_argument("--iterations", type=int, default=5, help="timed updates per side")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads of each side (default 2)")
    parser.add_argument(
        "--ours-ppo",
        nargs="+",
        default=[],
        metavar="FIELD=JSON",
        help="a third side, ours+: ours with these PPOConfig fields changed (e.g. forward_batch_size=8)",
    )
    parser.add_argument(
        "--sides", nargs="+", default=None, choices=("ours", "trl", "ours+"), help="default: ours trl (ours+)"
    )
    parser.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--updates", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        if args.child == "trl":
            child_trl(args.presets[0], args.updates)
        else:
            overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.ours_ppo)}
            child_ours(args.presets[0], args.updates, overrides)
        return
    try:
        import trl.experimental.ppo  # noqa: F401
    except ImportError as err:
        print(f"benchmarks.ppo_vs_trl skipped: TRL's PPOTrainer is not importable ({err}); pip install trl==0.29.1")
        return
    import trl

    from benchmarks.common import CACHE

    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"trl {trl.__version__}, {args.threads} threads per side; logs in {CACHE}", flush=True)
    report = {}
    sides = args.sides or ["ours", "trl", *(["ours+"] if args.ours_ppo else [])]
    for preset in args.presets:
        report[preset] = run_preset(preset, args.warmup, args.iterations, CACHE, args.threads, args.ours_ppo, sides)
        print_table(preset, report[preset])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
