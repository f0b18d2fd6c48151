"""PolicyGradientModule, the one policy-gradient stage: PPOModule and CriticFreeModule are presets of it, and an
algorithm object alone chooses what a step computes (PPO with K responses per prompt, a critic-free algorithm
with the same roles)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_rlhf.datamodules.prompts import PromptDataModule, repeat_prompts
from lit_rlhf.hf import ModelSpec
from lit_rlhf.models import CriticFreeModule, PolicyGradientModule, PPOConfig, PPOModule
from lit_rlhf.models.ppo import RewardConfig, SamplingConfig
from lit_rlhf.models.ppo_config import UpdateConfig
from lit_rlhf.quickstart.task import prompt_examples
from lit_rlhf.rlhf import gae, masked_whiten, per_token_rewards
from lit_rlhf.rlhf.algorithms import GRPO, PPO
from tests.conftest import write_jsonl
from tests.helpers import count_e, cpu_trainer, prompt_batch


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "train.jsonl", prompt_examples(16, seed=1, split="train"))


def test_presets_are_the_generic_module_with_an_algorithm(tiny_model_dir):
    spec = ModelSpec(str(tiny_model_dir))
    ppo = PPOModule(policy=spec, value_head=True, reward=RewardConfig(fn=count_e), ppo=PPOConfig(clip_range=0.3))
    assert isinstance(ppo, PolicyGradientModule) and ppo.update is ppo.ppo
    assert ppo.algo == PPO(clip_low=0.3, clip_high=0.3, gamma=1.0, lam=0.95, value_clip_range=0.2, vf_coef=0.1)
    grpo = CriticFreeModule(policy=spec, reward=RewardConfig(fn=count_e), algorithm=GRPO(group_size=3))
    assert isinstance(grpo, PolicyGradientModule) and grpo.update == UpdateConfig() and grpo.algo.group_size == 3
    assert grpo.roles.value_source is None and ppo.roles.value_source == "value_head"


def test_ppo_with_k_responses_per_prompt(tiny_model_dir, tiny_classifier_dir, prompt_file):
    """The PPO algorithm object with group_size 2 and a critic: each prompt sampled twice (copies adjacent), GAE on
    every response and whitened over all of them, then one update that trains policy and critic only."""
    torch.manual_seed(0)
    module = PolicyGradientModule(
        policy=ModelSpec(str(tiny_model_dir)),
        algorithm=PPO(group_size=2),
        update=UpdateConfig(ppo_epochs=1, micro_batch_size=4, critic_lr=1e-3),
        critic=ModelSpec(str(tiny_classifier_dir)),
        reward_model=ModelSpec(str(tiny_classifier_dir)),
        sampling=SamplingConfig(max_new_tokens=6),
    )
    module.configure_model()
    assert [g.get("lr") for g in module.trainable_parameters()] == [None, 1e-3]  # the critic's own group
    batch = prompt_batch(module, prompt_file, 3)
    grouped = module.grouped(batch)
    assert grouped["prompts"] == [p for p in batch["prompts"] for _ in range(2)]
    assert torch.equal(grouped["prompt_input_ids"], batch["prompt_input_ids"].repeat_interleave(2, 0))
    rollout, stats = module.collect_rollout(grouped)
    assert len(rollout.responses) == 6 and not torch.equal(rollout.responses[0], rollout.responses[1])
    # the advantages by hand: k1 KL reward per token, score on the last token, GAE(1, 0.95), whitened over all rows
    kl = (rollout.logprobs - rollout.ref_logprobs).masked_fill(~rollout.mask, 0)
    last = rollout.mask.sum(1) - 1
    rewards, _ = per_token_rewards(kl, rollout.scores, last, module.kl_ctl.value, rollout.mask)
    assert torch.allclose(rewards, rollout.rewards, atol=1e-7)
    raw, returns = gae(rewards, rollout.values, rollout.mask, 1.0, 0.95)
    assert torch.allclose(returns, rollout.returns, atol=1e-6)
    assert torch.allclose(masked_whiten(raw, rollout.mask).masked_fill(~rollout.mask, 0), rollout.advantages, atol=1e-6)
    assert "value/explained_variance" in stats and "train/zero_signal_groups" in stats

    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = cpu_trainer(max_steps=1)
    trainer.fit(module, PromptDataModule(str(prompt_file), batch_size=3))
    changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}
    assert any(n.startswith("policy.") for n in changed) and any(n.startswith("critic.") for n in changed)
    assert not any(n.startswith(("reference.", "reward_model.")) for n in changed)
    assert module.iteration == 1


def test_a_value_function_is_refused_by_an_algorithm_without_one(tiny_model_dir):
    spec = ModelSpec(str(tiny_model_dir))
    with pytest.raises(ValueError, match="learns no value function"):
        PolicyGradientModule(policy=spec, algorithm=GRPO(), value_head=True, reward=RewardConfig(fn=count_e))
    with pytest.raises(ValueError, match="exactly one value function"):
        PolicyGradientModule(policy=spec, algorithm=PPO(), reward=RewardConfig(fn=count_e))


def test_repeat_prompts_keeps_a_single_sample_batch_as_it_is():
    batch = {"prompt_input_ids": torch.ones(2, 3), "prompts": ["a", "b"], "other": 5}
    assert repeat_prompts(batch, 1) is batch
    out = repeat_prompts(batch, 3)
    assert out["prompts"] == ["a"] * 3 + ["b"] * 3 and out["other"] == 5 and out["prompt_input_ids"].shape == (6, 3)
