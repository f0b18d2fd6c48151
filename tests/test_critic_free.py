"""CriticFreeModule (GRPO, Dr. GRPO, RLOO, REINFORCE++) on tiny offline models: groups from one generate call,
advantages in the rollout, the first ratio, micro-batch equivalence, zero-signal groups, learning, LoRA/4-bit,
PTX, resume and the quickstart configs through the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_rlhf.cli import main
from lit_rlhf.datamodules.prompts import PromptDataModule
from lit_rlhf.hf import LoraSpec, ModelSpec
from lit_rlhf.models import CriticFreeConfig, CriticFreeModule
from lit_rlhf.models.critic_free import UpdateConfig
from lit_rlhf.models.ppo import KLConfig, PTXConfig, RewardConfig, SamplingConfig
from lit_rlhf.quickstart.task import prompt_examples
from lit_rlhf.rlhf import (
    group_advantages,
    kl_penalty,
    logprobs_from_logits,
    per_token_rewards,
    reinforce_pp_advantages,
    response_masks,
    rloo_advantages,
    zero_signal_groups,
)
from lit_rlhf.rlhf.algorithms import CISPO, DAPO, GSPO, PPO
from tests.conftest import write_jsonl
from tests.helpers import DeterministicGroups, count_e, cpu_trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prompts")
    return (
        write_jsonl(root / "train.jsonl", prompt_examples(64, seed=1, split="train")),
        write_jsonl(root / "eval.jsonl", prompt_examples(8, seed=2, split="eval")),
    )


def build(model_dir, cls=CriticFreeModule, **kwargs) -> CriticFreeModule:
    kwargs.setdefault("reward", RewardConfig(fn=count_e))
    kwargs.setdefault("sampling", SamplingConfig(max_new_tokens=8, temperature=0.7))
    module = cls(policy=kwargs.pop("policy", ModelSpec(str(model_dir))), **kwargs)
    module.configure_model()
    return module


def grouped_batch(module: CriticFreeModule, path: Path, size: int = 4) -> dict:
    dm = PromptDataModule(str(path), batch_size=size)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    return module.grouped(dm.collate([dm.train_dataset[i] for i in range(size)]))


@pytest.fixture(scope="module")
def module(tiny_model_dir) -> CriticFreeModule:
    """One built module for the rollout tests; each test sets its own ``algorithm``."""
    return build(tiny_model_dir, kl=KLConfig(coef=0.3))


def configure(module: CriticFreeModule, algorithm: CriticFreeConfig) -> CriticFreeModule:
    module.algorithm = module.ppo = algorithm
    return module


def test_groups_come_from_one_generate_call_with_a_prompts_copies_adjacent(module, prompts, monkeypatch):
    configure(module, CriticFreeConfig(group_size=3))
    assert module.value_head is None and module.critic is None
    assert all("value" not in n for n, _ in module.named_parameters())
    batch = grouped_batch(module, prompts[0], size=4)
    assert batch["prompts"][:6] == [batch["prompts"][0]] * 3 + [batch["prompts"][3]] * 3
    calls = []
    generate = module.generate
    monkeypatch.setattr(module, "generate", lambda ids, mask, seed: calls.append(len(ids)) or generate(ids, mask, seed))
    rollout, stats = module.collect_rollout(batch)
    assert calls == [12] and rollout.responses.shape[0] == 12
    # the three copies of a prompt got different samples (one seeded generate call, not three identical ones)
    assert len({tuple(r.tolist()) for r in rollout.responses[:3]}) > 1
    assert torch.equal(rollout.values, torch.zeros_like(rollout.values))
    assert "value/explained_variance" not in stats and "train/zero_signal_groups" in stats


def test_grouped_repeats_every_per_prompt_field(module, prompts, tmp_path):
    """Every field of a batch with one entry per prompt is repeated K times, copies adjacent, whatever its name;
    the rest is kept as it is."""
    configure(module, CriticFreeConfig(group_size=2))
    rows = [{"messages": [{"role": "user", "content": "The phone was"}]}, {"prompt": "The movie was"}]
    dm = PromptDataModule(str(write_jsonl(tmp_path / "chat.jsonl", rows)), batch_size=2)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    batch = dm.collate(dm.train_dataset)
    assert batch["prompt_messages"] == [rows[0]["messages"], None]
    # fields a data module might add: per prompt (a tensor, a tuple) and not (a scalar, another length, a string)
    batch |= {"extra": torch.tensor([[1, 2], [3, 4]]), "ids": ("a", "b"), "step": torch.tensor(7)}
    batch |= {"weights": [0.5, 0.25, 0.25], "name": "xy"}
    out = module.grouped(batch)
    assert out.keys() == batch.keys()
    for key in ("prompt_input_ids", "prompt_attention_mask", "extra"):  # rows 0 0 1 1
        assert torch.equal(out[key], batch[key][[0, 0, 1, 1]]), key
    for key in ("prompts", "prompt_messages", "ids"):
        assert list(out[key]) == [batch[key][0]] * 2 + [batch[key][1]] * 2, key
    assert out["step"] is batch["step"] and out["weights"] is batch["weights"] and out["name"] == "xy"
    # whatever PromptDataModule's batches hold now or later, nothing stays at one row per prompt
    assert all(len(out[key]) == 4 for key in dm.collate(dm.train_dataset))


@pytest.mark.parametrize(
    ("estimator", "kl_in"),
    [("grpo", "loss"), ("dr_grpo", "reward"), ("rloo", "reward"), ("rloo", "loss"), ("reinforce_pp", "reward")],
)
def test_rollout_advantages_are_the_estimators_formula(module, prompts, estimator, kl_in):
    configure(module, CriticFreeConfig(estimator, 4, kl_in))
    rollout, stats = module.collect_rollout(grouped_batch(module, prompts[0]))
    mask = rollout.mask
    lengths = response_masks(rollout.responses, module.tokenizer.pad_token_id, module.tokenizer.eos_token_id)[0]
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs).masked_fill(~mask, 0)
    beta = 0.3 if kl_in == "reward" else 0.0
    rewards, _ = per_token_rewards(kl, rollout.scores, lengths, beta, mask)
    assert rollout.scores.tolist() == count_e(None, module.tokenizer.batch_decode(rollout.responses, True))
    if estimator == "reinforce_pp":
        expected = reinforce_pp_advantages(rewards, mask)[0]
    else:
        sequence = rollout.scores - beta * kl.sum(1)  # the score minus β·Σ KL when the KL is in the reward
        fn = {
            "grpo": lambda r: group_advantages(r, 4),
            "dr_grpo": lambda r: group_advantages(r, 4, scale=False),
            "rloo": lambda r: rloo_advantages(r, 4),
        }[estimator]
        expected = torch.where(mask, fn(sequence)[:, None], 0)
    torch.testing.assert_close(rollout.advantages, expected, atol=1e-6, rtol=0)
    assert stats["objective/kl"] == pytest.approx(float(kl.sum(1).mean()), abs=1e-6)


def test_first_update_ratio_is_one(module, prompts):
    configure(module, CriticFreeConfig())
    rollout, _ = module.collect_rollout(grouped_batch(module, prompts[0]))
    micro = rollout.select([9, 2, 14, 5]).trim()  # another grouping and padding width than in the rollout
    logits, _ = module.policy_forward(micro.query_responses, micro.attention_mask, micro.responses.shape[1])
    new = logprobs_from_logits(logits, micro.responses, 0.7)
    assert (torch.exp(torch.where(micro.mask, new - micro.logprobs, 0)) - 1).abs().max() < 1e-5


def test_micro_batches_do_not_change_the_step(tmp_path, tiny_model_dir, prompts, module):
    """One optimizer step on the same rollout, whole or in micro-batches of 3 rows: the same weights (the
    per-response normaliser of ``sequence_mean`` counts the whole step)."""

    def step(micro_batch_size):
        L.seed_everything(0)
        algorithm = CriticFreeConfig(loss_aggregation="sequence_mean", micro_batch_size=micro_batch_size)
        trained = build(
            tiny_model_dir,
            DeterministicGroups,
            algorithm=algorithm,
            max_grad_norm=None,
            optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        )
        cpu_trainer(max_steps=1, default_root_dir=tmp_path).fit(
            trained, PromptDataModule(str(prompts[0]), batch_size=4)
        )
        return dict(trained.policy.named_parameters())

    whole, split = step(None), step(3)
    initial = dict(module.policy.named_parameters())  # never trained
    assert any(not torch.equal(whole[n], initial[n]) for n in whole)
    for name, p in whole.items():
        torch.testing.assert_close(split[name], p, atol=1e-6, rtol=0, msg=name)


def test_zero_signal_groups_are_counted_and_dropped(tmp_path, tiny_model_dir, prompts):
    """A constant reward gives every group zero signal: counted, and dropping them leaves the policy as it was."""
    logged = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(float(trainer.callback_metrics["train/zero_signal_groups"]))

    module = build(
        tiny_model_dir,
        algorithm=CriticFreeConfig(drop_zero_signal_groups=True, kl_in="loss"),
        reward=RewardConfig(fn=lambda p, r: [1.0] * len(r)),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
    )
    before = {n: p.clone() for n, p in module.policy.named_parameters()}
    cpu_trainer(max_steps=2, default_root_dir=tmp_path, callbacks=[Record()]).fit(
        module, PromptDataModule(str(prompts[0]), batch_size=4)
    )
    assert logged == [4.0, 4.0]
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_parameters())
    assert module.faults_total == 0  # no NaN from the empty normalisers


def test_learns_a_rule_based_reward(tmp_path, tiny_model_dir, prompts):
    """A random tiny policy learns to write more letters "e" when each one earns a point."""
    L.seed_everything(0)
    module = CriticFreeModule(
        policy=ModelSpec(str(tiny_model_dir)),
        reward=RewardConfig(fn=count_e),
        algorithm=CriticFreeConfig("grpo", group_size=4, ppo_epochs=4),
        sampling=SamplingConfig(max_new_tokens=6),
        kl=KLConfig(coef=0.01),
        optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3),
    )
    scores = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            scores.append(float(outputs["score"]))

    trainer = cpu_trainer(max_steps=4 * 16, default_root_dir=tmp_path, callbacks=[Record()])
    trainer.fit(module, PromptDataModule(str(prompts[0]), batch_size=8))  # 16 iterations of 8 prompts x 4
    assert len(scores) == 16
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert first < 0.6 and last > 0.4 + first, scores  # measured: 0.36 -> 1.00 (many early groups score all 0)


def test_lora_on_a_4bit_base_with_a_4bit_reward_model_and_ptx(tmp_path, tiny_model_dir, tiny_classifier_dir, prompts):
    import bitsandbytes as bnb

    from lit_rlhf.callbacks import LoRAQuantization
    from lit_rlhf.hf import QuantizationSpec

    module = CriticFreeModule(
        policy=ModelSpec(str(tiny_model_dir)),
        reward_model=ModelSpec(str(tiny_classifier_dir)),
        sampling=SamplingConfig(max_new_tokens=4),
        ptx=PTXConfig(data=str(prompts[0]), text_column="prompt", coef=0.5, batch_size=4),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    four_bit = QuantizationSpec(bits=4, compute_dtype="float32")
    callbacks = [
        LoRAQuantization(lora=LoraSpec(r=4), quantization=four_bit, roles=["policy"]),
        LoRAQuantization(quantization=four_bit, roles=["reward_model"]),
    ]
    metrics = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = cpu_trainer(max_steps=1, default_root_dir=tmp_path, callbacks=[*callbacks, Record()])
    trainer.fit(module, PromptDataModule(str(prompts[0]), batch_size=2))
    assert module.reference is None  # the disabled adapter
    for model in (module.policy, module.reward_model):
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert metrics["ptx/loss"] > 0 and "policy/kl_loss_term" in metrics
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    saved = torch.load(tmp_path / "q.ckpt", weights_only=True)
    assert saved["state_dict"] and all("lora_" in k for k in saved["state_dict"] if k.startswith("policy."))
    assert {k.split(".")[0] for k in saved["state_dict"]} == {"policy", "score_moments", "skipped_steps"}
    assert saved["ppo_state"]["iteration"] == 1


def _resume_run(tmp_path, model_dir, prompts_path, steps: int, ckpt_path=None, record=None) -> CriticFreeModule:
    module = CriticFreeModule(
        policy=ModelSpec(str(model_dir)),
        reward=RewardConfig(fn=count_e, normalize=True),
        algorithm=CriticFreeConfig("rloo", group_size=2, num_mini_batches=2),
        sampling=SamplingConfig(max_new_tokens=5),
        kl=KLConfig(coef=0.2, target=0.01, horizon=100),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0),
    )
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = cpu_trainer(
        max_steps=steps, default_root_dir=tmp_path, callbacks=[record, saver], enable_checkpointing=True
    )
    trainer.fit(module, PromptDataModule(str(prompts_path), batch_size=4), ckpt_path=ckpt_path)
    return module


def test_interrupted_run_resumes_exactly(tmp_path, tiny_model_dir):
    prompts_path = write_jsonl(tmp_path / "p.jsonl", prompt_examples(12, seed=5))  # 3 iterations per epoch

    class Record(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append((batch["prompts"], round(float(outputs["kl"]), 5), round(float(outputs["score"]), 5)))

    full, first, second = Record(), Record(), Record()
    whole = _resume_run(tmp_path / "a", tiny_model_dir, prompts_path, steps=2 * 4, record=full)
    _resume_run(tmp_path / "b", tiny_model_dir, prompts_path, steps=2 * 2, record=first)
    ckpt = tmp_path / "b" / "ckpt" / "last.ckpt"
    resumed = _resume_run(tmp_path / "b", tiny_model_dir, prompts_path, steps=2 * 4, ckpt_path=ckpt, record=second)
    assert len(full.seen) == 4 and first.seen == full.seen[:2] and second.seen == full.seen[2:]
    assert resumed.iteration == whole.iteration == 4
    assert resumed.kl_ctl.value == whole.kl_ctl.value != 0.2
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_bad_configurations_fail_with_the_field_name(tiny_model_dir):
    with pytest.raises(ValueError, match="group_size must be >= 2 for 'grpo'"):
        CriticFreeConfig(group_size=1)
    assert CriticFreeConfig("reinforce_pp", group_size=1).kl_in == "reward"
    assert CriticFreeConfig("grpo").kl_in == "loss" and CriticFreeConfig("rloo").kl_in == "reward"
    with pytest.raises(ValueError, match="loss_aggregation"):
        CriticFreeConfig(loss_aggregation="seq")
    with pytest.raises(ValueError, match="exactly one score source"):
        CriticFreeModule(policy=ModelSpec(str(tiny_model_dir)))


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_quickstart_config_runs_end_to_end(tmp_path, tiny_model_dir, tiny_classifier_dir, prompts, sft_jsonl, method):
    root = tmp_path / "qs"
    shutil.copy(sft_jsonl[0], write_jsonl(root / "data" / "sft" / "train.jsonl", []))  # the PTX data
    shutil.copytree(tiny_model_dir, root / "sft" / "export")
    shutil.copytree(tiny_classifier_dir, root / "rm" / "export")
    shutil.copy(prompts[0], write_jsonl(root / "data" / "prompts" / "train.jsonl", []))
    shutil.copy(prompts[1], root / "data" / "prompts" / "eval.jsonl")
    config = (REPO / "configs" / "quickstart" / f"{method}.yaml").read_text().replace("runs/quickstart", str(root))
    (tmp_path / f"{method}.yaml").write_text(config)
    main(
        [
            "fit",
            "--config",
            str(tmp_path / f"{method}.yaml"),
            "--trainer.limit_train_batches=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.sampling.max_new_tokens=6",
            "--data.init_args.batch_size=2",
        ]
    )
    ckpt = torch.load(root / method / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["ppo_state"]["iteration"] == 2 and ckpt["hyper_parameters"]["algorithm"]["estimator"] == method
    assert (root / method / "export" / "model.safetensors").is_file()
    metrics = (root / method / "logs" / "metrics.csv").read_text()
    for key in ("objective/kl", "objective/score", "policy/ratio", "train/zero_signal_groups", "gold/score"):
        assert key in metrics
    assert "ptx/loss" in metrics  # both configs carry PTX on the demonstrations


# ---- algorithms given as objects (class_path in YAML) ----------------------------------------------------------
def response_length(prompts, responses) -> list[float]:
    """A reward that almost never ties inside a group: the response's length in characters."""
    return [float(len(r)) for r in responses]


@pytest.mark.parametrize("cls", [GSPO, CISPO, DAPO], ids=lambda c: c.__name__)
def test_new_algorithms_train_a_step_through_the_module(tmp_path, tiny_model_dir, prompts, cls):
    """GSPO, CISPO and DAPO each take optimizer steps through CriticFreeModule (the trainable weights change), log
    the policy statistics, and their checkpoint (the object in the hyper-parameters) loads weights-only."""
    L.seed_everything(0)
    module = build(
        tiny_model_dir,
        algorithm=cls(group_size=4),
        update=UpdateConfig(ppo_epochs=2, num_mini_batches=2),
        reward=RewardConfig(fn=response_length),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
    )
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    metrics = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = cpu_trainer(max_steps=4, default_root_dir=tmp_path, callbacks=[Record()])
    trainer.fit(module, PromptDataModule(str(prompts[0]), batch_size=4))
    assert module.iteration == 1 and trainer.global_step == 4  # 2 epochs x 2 minibatches of one rollout
    changed = [n for n, p in module.policy.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert metrics["policy/ratio"] == pytest.approx(1.0, abs=0.2) and "train/zero_signal_groups" in metrics
    assert ("policy/kl_loss_term" in metrics) == (cls is not DAPO)  # DAPO: no KL to the reference
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    saved = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["algorithm"] == cls(group_size=4)


def test_dapo_rollout_shapes_the_scores_and_drops_the_groups_without_signal(tiny_model_dir, prompts):
    """The overlong penalty joins the score before GRPO's advantages; groups whose shaped scores are all equal
    leave the loss mask; KL stays out of the reward."""
    dapo = DAPO(group_size=4, overlong_max_length=8, overlong_cache=4)
    module = build(tiny_model_dir, DeterministicGroups, algorithm=dapo, kl=KLConfig(coef=0.3))  # EOS anywhere
    rollout, stats = module.collect_rollout(grouped_batch(module, prompts[0]))
    full = response_masks(rollout.responses, module.tokenizer.pad_token_id, module.tokenizer.eos_token_id)[1]
    lengths = full.sum(1)
    # 0 up to 4 tokens, then (4 − |y|) / 4: 8 tokens (the cap) cost a whole point
    penalty = torch.clamp((4 - lengths.float()) / 4, max=0)
    shaped = rollout.scores + penalty
    assert bool((penalty < 0).any() and (penalty == 0).any())
    keep = ~zero_signal_groups(shaped, 4)
    expected = torch.where(full & keep.repeat_interleave(4)[:, None], group_advantages(shaped, 4)[:, None], 0)
    torch.testing.assert_close(rollout.advantages, expected, atol=1e-6, rtol=0)
    assert torch.equal(rollout.mask, full & keep.repeat_interleave(4)[:, None])
    assert float(stats["train/zero_signal_groups"]) == float((~keep).sum()) and bool(keep.any())
    assert torch.equal(rollout.rewards.sum(1), torch.where(full.any(1), shaped, 0))  # no −β·KL in the reward


def test_algorithm_objects_are_refused_where_they_do_not_fit(tiny_model_dir):
    spec, reward = ModelSpec(str(tiny_model_dir)), RewardConfig(fn=count_e)
    with pytest.raises(ValueError, match="algorithm PPO needs a critic: use PPOModule"):
        CriticFreeModule(policy=spec, reward=reward, algorithm=PPO())
    with pytest.raises(ValueError, match="`update` goes with an algorithm given by class_path"):
        CriticFreeModule(policy=spec, reward=reward, algorithm=CriticFreeConfig(), update=UpdateConfig())
    with pytest.raises(ValueError, match="update.ppo_epochs must be >= 1"):
        UpdateConfig(ppo_epochs=0)


@pytest.mark.parametrize("name", ["gspo", "cispo", "dapo"])
def test_example_configs_choose_the_algorithm_by_class_path(name):
    cli = main(
        ["--config", str(REPO / "configs" / "examples" / f"{name}.yaml"), "--trainer.logger=false"]
        + ["--trainer.accelerator=cpu", "--trainer.precision=32-true"],
        run=False,
    )
    assert type(cli.model.algorithm).__name__ == name.upper() and cli.model.algo is cli.model.algorithm
    assert cli.model.ppo == UpdateConfig(ppo_epochs=1, num_mini_batches=4, micro_batch_size=8, forward_batch_size=32)
