"""The models a policy-gradient run holds, built from its :class:`~lit_rlhf.models.roles.Roles` through the one
loading path (:mod:`lit_rlhf.hf`): policy, reference (or none: the disabled adapter), critic or value head (or
none), and the :class:`~lit_rlhf.hf.scoring.Scorer` with the frozen model it runs."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_rlhf.datamodules.preference import read_scored_pairs
from lit_rlhf.hf.loading import load_model, load_tokenizer, unwrap_peft
from lit_rlhf.hf.reward import RewardScorer
from lit_rlhf.hf.scorers import Scorer, load_scorer, require_policy_tokens
from lit_rlhf.hf.shared_base import SharedBase, load_shared_base
from lit_rlhf.models.ppo_config import RewardConfig, SharedBaseConfig
from lit_rlhf.models.roles import Roles

__all__ = ["RoleModels", "build_role_models"]


class RoleModels(NamedTuple):
    """The loaded models of a policy-gradient run; ``None`` for a role the run does not hold."""

    policy: nn.Module
    reference: nn.Module | None
    """A frozen model of its own; ``None`` when the reference is the policy with its adapter(s) disabled."""
    critic: nn.Module | None
    value_head: nn.Linear | None
    reward_model: nn.Module | None
    """The frozen module the scorer runs (``None`` for a function)."""
    scorer: Scorer
    shared: SharedBase | None
    """Adapter switching when every role lives on one base."""


def build_role_models(
    roles: Roles,
    tokenizer,
    device: torch.device,
    reward: RewardConfig,
    shared_base: SharedBaseConfig | None = None,
) -> RoleModels:
    """Load every model ``roles`` names onto ``device`` (frozen roles frozen), and the run's scorer."""
    specs = roles.specs()
    if shared_base is not None:
        return _build_shared_base(roles, tokenizer, device, reward, shared_base)
    policy = load_model(specs["policy"], tokenizer, "causal_lm", trainable=True, device=device)
    # a LoRA policy with its adapter disabled *is* the reference, unless another one is given explicitly
    reference = None
    if roles.loads_reference:
        reference = load_model(specs["reference"], tokenizer, "causal_lm", trainable=False, device=device)
    critic = value_head = None
    if roles.value_source == "critic":
        require_policy_tokens(specs["critic"], tokenizer)
        critic = load_model(specs["critic"], tokenizer, "sequence_classifier", trainable=True, device=device)
    elif roles.value_source == "value_head":
        value_head = nn.Linear(unwrap_peft(policy).config.hidden_size, 1)
        nn.init.zeros_(value_head.weight)  # V ≡ 0 at start (OpenAI 2019) instead of random values
        nn.init.zeros_(value_head.bias)
    scorer = _load_scorer(specs.get("reward_model"), reward, device)
    return RoleModels(policy, reference, critic, value_head, scorer.model, scorer, None)


def _build_shared_base(
    roles: Roles, tokenizer, device: torch.device, reward: RewardConfig, shared: SharedBaseConfig
) -> RoleModels:
    """Policy, critic and reward model as adapters of one base; the reference is the base alone."""
    if roles.policy.lora is None:  # checked here: LoRAQuantization may set it after __init__
        raise ValueError(
            "shared_base needs a LoRA policy (policy.lora, or a LoRAQuantization callback): the base itself "
            "is the frozen reference."
        )
    adapter = shared.reward_adapter
    tokenizer_saved = adapter is not None and (Path(adapter) / "tokenizer_config.json").exists()
    if tokenizer_saved and load_tokenizer(str(adapter)).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"reward adapter {adapter!r} must share the policy's tokenizer.")
    base, critic, reward_model = load_shared_base(
        roles.policy,
        tokenizer,
        shared.reward_adapter,
        shared.critic_init if roles.value_function else None,
        shared.critic_lora,
        device,
    )
    if reward_model is not None:  # the reward adapter reads the policy's own tokens
        scorer = RewardScorer(reward_model, tokenizer)
    else:
        scorer = _load_scorer(None, reward, device)
        reward_model = scorer.model
    return RoleModels(base.model, None, critic, None, reward_model, scorer, base)


def _load_scorer(spec, reward: RewardConfig, device: torch.device) -> Scorer:
    """A reward model keeps its own tokenizer: scored on the policy's tokens when the vocabularies match, else
    decoded and re-encoded (:mod:`lit_rlhf.hf.reward`); or ``reward.scorer`` / ``reward.fn``."""
    path = reward.normalize_on
    pairs = None if path is None else read_scored_pairs(path)
    if pairs is not None:
        rank_zero_info(
            f"reward.normalize_on: {len(pairs[0])} pairs of {path} will score mean 0 under {spec.name_or_path}"
        )
    return load_scorer(spec, reward.scorer or reward.fn, device, pairs)
