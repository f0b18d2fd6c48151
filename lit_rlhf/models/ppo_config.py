"""Configuration of the policy-gradient stages (:class:`~lit_rlhf.models.PolicyGradientModule` and its presets
:class:`~lit_rlhf.models.PPOModule`, :class:`~lit_rlhf.models.CriticFreeModule`): typed dataclasses that are the
YAML schema of ``model.init_args.{sampling,ppo,update,kl,reward,ptx,shared_base}``. Each checks its values when
it is built.

The critic-free stage's estimator form (``critic_free_config.py``) builds on these; the import points that way
only, this module knows nothing of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

from lit_rlhf.hf.generation import SamplingConfig
from lit_rlhf.hf.scoring import Scorer
from lit_rlhf.hf.specs import LoraSpec
from lit_rlhf.imports import RewardFn
from lit_rlhf.rlhf.algorithms import PPO, Algorithm
from lit_rlhf.rlhf.kl import KLEstimator

__all__ = ["KLConfig", "PPOConfig", "PTXConfig", "RewardConfig", "SamplingConfig", "SharedBaseConfig", "UpdateConfig"]


class AlgorithmForm(Protocol):
    """A configuration section that builds an algorithm object (:class:`PPOConfig`, the critic-free estimator
    form)."""

    def to_algorithm(self) -> Algorithm: ...


def as_algorithm(algorithm: Algorithm | AlgorithmForm) -> Algorithm:
    """The algorithm object of a policy-gradient stage's ``algorithm`` argument: an object, or a form that builds
    one (PPO's ``ppo`` section, the critic-free ``estimator:`` form)."""
    return algorithm if isinstance(algorithm, Algorithm) else algorithm.to_algorithm()


@runtime_checkable
class UpdateLoop(Protocol):
    """The update-loop fields that :class:`PPOConfig` and the critic-free stage's ``CriticFreeConfig`` share."""

    ppo_epochs: int
    num_mini_batches: int
    micro_batch_size: int | None
    forward_batch_size: int | None


def check_update_loop(config: UpdateLoop, section: str) -> None:
    """Checks the update-loop fields that PPO and the critic-free stage share (``ppo_epochs``,
    ``num_mini_batches``, ``micro_batch_size``, ``forward_batch_size``); errors name ``section.field``."""
    for name in ("ppo_epochs", "num_mini_batches"):
        if getattr(config, name) < 1:
            raise ValueError(f"{section}.{name} must be >= 1, got {getattr(config, name)}")
    for name in ("micro_batch_size", "forward_batch_size"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ValueError(f"{section}.{name} must be >= 1 or null, got {getattr(config, name)}")


@dataclass
class PPOConfig:
    """The PPO optimisation loop."""

    ppo_epochs: int = 4
    """Passes over each rollout batch (InstructGPT: 1, TRL: 4)."""
    num_mini_batches: int = 1
    """Optimizer steps per epoch; the rollout batch is cut into this many minibatches."""
    micro_batch_size: int | None = None
    """Rows per forward/backward pass (gradient accumulation); ``None`` = the whole minibatch."""
    forward_batch_size: int | None = None
    """Rows per no-grad forward pass while collecting rollouts; ``None`` = the whole batch."""
    clip_range: float = 0.2
    """ε of the clipped surrogate."""
    value_clip_range: float | None = 0.2
    """ε_v of the clipped value loss; ``None`` disables value clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    gamma: float = 1.0
    """GAE discount (InstructGPT: no discount)."""
    lam: float = 0.95
    """GAE λ."""
    critic_lr: float | None = None
    """Learning rate of the critic's parameters (a second param group); ``None`` = the optimizer's."""

    def __post_init__(self) -> None:
        check_update_loop(self, "ppo")
        if not self.clip_range > 0:
            raise ValueError(f"ppo.clip_range must be > 0, got {self.clip_range}")
        if self.value_clip_range is not None and not self.value_clip_range > 0:
            raise ValueError(f"ppo.value_clip_range must be > 0 or null, got {self.value_clip_range}")
        if self.vf_coef < 0:
            raise ValueError(f"ppo.vf_coef must be >= 0, got {self.vf_coef}")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"ppo.gamma and ppo.lam must lie in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        if self.critic_lr is not None and not self.critic_lr > 0:
            raise ValueError(f"ppo.critic_lr must be > 0 or null, got {self.critic_lr}")

    def to_algorithm(self) -> PPO:
        """The :class:`~lit_rlhf.rlhf.algorithms.PPO` object of these fields (``clip_range`` on both sides)."""
        return PPO(
            clip_low=self.clip_range,
            clip_high=self.clip_range,
            gamma=self.gamma,
            lam=self.lam,
            value_clip_range=self.value_clip_range,
            vf_coef=self.vf_coef,
        )


@dataclass
class UpdateConfig:
    """The update loop of a policy-gradient stage whose ``algorithm`` is given by ``class_path`` (``PPOConfig``
    and the critic-free estimator form carry these fields themselves)."""

    ppo_epochs: int = 1
    """Passes over each rollout batch (TRL ``num_iterations``; 1 = on-policy, the ratio is 1 in every step)."""
    num_mini_batches: int = 1
    """Optimizer steps per epoch; the rollout's G·K responses are cut into this many minibatches."""
    micro_batch_size: int | None = None
    """Responses per forward/backward pass (gradient accumulation); ``None`` = the whole minibatch."""
    forward_batch_size: int | None = None
    """Responses per no-grad forward pass while collecting rollouts; ``None`` = all at once."""
    critic_lr: float | None = None
    """Learning rate of the critic's parameters (a second param group) when the algorithm has one; ``None`` = the
    optimizer's."""

    def __post_init__(self) -> None:
        check_update_loop(self, "update")
        if self.critic_lr is not None and not self.critic_lr > 0:
            raise ValueError(f"update.critic_lr must be > 0 or null, got {self.critic_lr}")


@dataclass
class KLConfig:
    """The KL penalty to the reference policy (docs/conventions.md#kl-penalty)."""

    coef: float = 0.05
    """β, or its initial value for the adaptive controller (InstructGPT 0.02, TRL 0.05)."""
    estimator: KLEstimator = "k1"
    """Per-token estimator in the reward: k1 = log π − log π_ref (unbiased, may be < 0), k2 = ½(log ratio)²,
    k3 = (ratio − 1) − log ratio with ratio = π_ref / π (≥ 0)."""
    target: float | None = None
    """Adaptive control (Ziegler et al.) towards this KL in **nats per sequence**; ``None`` = fixed β."""
    horizon: int = 10000
    """Adaptive controller horizon, in episodes (sampled responses)."""

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"kl.coef must be >= 0, got {self.coef}")
        if self.target is not None and not self.target > 0:
            raise ValueError(f"kl.target must be > 0 nats per sequence or null, got {self.target}")
        if self.horizon < 1:
            raise ValueError(f"kl.horizon must be >= 1, got {self.horizon}")


@dataclass
class RewardConfig:
    """Where scores come from and how they are shaped before entering the reward."""

    fn: str | RewardFn | None = None
    """Rule-based reward used instead of a reward model: ``"package.module:function"`` in YAML, or the callable
    itself from Python. Called as ``fn(prompts=, completions=, completion_ids=, **columns)`` (the prompt row's
    other columns, e.g. an ``answer``) or, for an older function, ``fn(prompts, responses)``
    (docs/conventions.md#reward-functions)."""
    normalize: bool = False
    """Whiten scores with running mean/std over all scores seen so far, over every process (checkpointed)."""
    clip: float | None = None
    """Clip scores (after normalisation) to ``[-clip, clip]``."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses that never emit EOS (TRL's "EOS trick")."""
    scorer: Scorer | None = None
    """Any :class:`~lit_rlhf.hf.scoring.Scorer` object (YAML: ``class_path``/``init_args``), used instead of a
    reward model or ``fn``: a scorer of your own (docs/conventions.md#scorers)."""
    normalize_on: str | None = None
    """File of prompt/response pairs (``prompt`` + ``response`` or ``completion``, or chat ``messages``) whose
    mean reward-model score becomes 0 at PPO start: the stored ``reward_bias`` is replaced by their mean raw
    score. For reward models that were never normalised (an off-the-shelf hub RM); ``None`` keeps the RM's own
    normalisation."""

    def __post_init__(self) -> None:
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"reward.clip must be > 0 or null, got {self.clip}")
        if self.fn is not None and self.scorer is not None:
            raise ValueError("give `reward.fn` or `reward.scorer`, not both")


@dataclass
class PTXConfig:
    """PPO-ptx (InstructGPT Eq. 2): a language-modelling loss on pretraining or SFT text, scaled by ``coef``,
    accumulated into every PPO optimizer step."""

    data: str
    """File or hub dataset: ``text_column`` rows (every token supervised) or SFT demonstrations (chat
    ``messages``, prompt/completion pairs standard or conversational), tokenized and masked as in SFT."""
    coef: float = 1.0
    """γ_ptx. InstructGPT's 27.8 depends on how its two losses were normalised; re-tune it."""
    batch_size: int = 8
    """Sequences drawn per optimizer step (per process)."""
    max_length: int = 512
    """Sequences are truncated to this many tokens."""
    text_column: str = "text"
    """Column of plain text rows."""
    prompt_column: str = "prompt"
    """Prompt column of prompt/completion rows."""
    completion_column: str = "completion"
    """Completion column of prompt/completion rows."""
    messages_column: str = "messages"
    """Column of chat demonstrations."""

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"ptx.coef must be >= 0, got {self.coef}")
        if self.batch_size < 1:
            raise ValueError(f"ptx.batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise ValueError(f"ptx.max_length must be >= 2 (one token is only context), got {self.max_length}")


@dataclass
class SharedBaseConfig:
    """All four PPO roles on **one** base model (docs/conventions.md#shared-base-ppo).

    The base is the ``policy`` spec (its ``name_or_path``, ``dtype``, ``quantization``,
    ``gradient_checkpointing``), loaded once. It carries named LoRA adapters: ``policy`` (``policy.lora``,
    trained), ``critic`` (trained, with a scalar value head) and ``reward_model`` (frozen, with the reward
    model's score head). The reference is the base with every adapter disabled. ``critic``, ``reward_model``,
    ``reference`` and ``value_head`` stay unset. ``CriticFreeModule`` takes the same block and loads no critic
    adapter (policy and reward model on one base).

    YAML (``model.init_args``)::

        policy: {name_or_path: runs/sft/export, lora: {r: 16, alpha: 32}, quantization: {bits: 4}}
        shared_base:
          reward_adapter: runs/rm/export_adapter   # RewardModule + HFExport(merge_adapters: false)
          critic_init: reward_model
    """

    reward_adapter: str | None = None
    """Folder of a reward model trained with LoRA **on the same base** and exported unmerged (``HFExport`` with
    ``merge_adapters: false``): ``adapter_config.json``, ``adapter_model.safetensors`` holding the LoRA weights
    and the ``score`` head, ``reward_normalization.json``. ``None`` when ``reward.fn`` gives the scores."""
    critic_init: Literal["reward_model", "zero"] = "reward_model"
    """``reward_model``: the critic adapter and its head start as copies of the reward adapter and score head,
    read with the reward normalisation (InstructGPT, docs/conventions.md#critic); ``zero``: a fresh adapter
    (``critic_lora``) and a zero-initialised value head (V ≡ 0 at start)."""
    critic_lora: LoraSpec | None = None
    """The critic adapter when ``critic_init: zero``; ``None`` = the policy's LoRA spec."""

    def __post_init__(self) -> None:
        if self.critic_init not in ("reward_model", "zero"):
            raise ValueError(f"shared_base.critic_init must be 'reward_model' or 'zero', got {self.critic_init!r}")
        if self.critic_init == "reward_model" and self.reward_adapter is None:
            raise ValueError(
                "shared_base.critic_init: reward_model needs shared_base.reward_adapter; "
                "with a reward.fn use critic_init: zero."
            )
        if self.critic_init == "reward_model" and self.critic_lora is not None:
            raise ValueError("shared_base.critic_lora applies to critic_init: zero only (else the reward adapter's).")


# The configs are saved in checkpoints' hyper-parameters; allow them in `torch.load(weights_only=True)`.
torch.serialization.add_safe_globals([PPOConfig, KLConfig, RewardConfig, PTXConfig, SharedBaseConfig, UpdateConfig])
