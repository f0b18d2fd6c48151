"""Which models a run holds, without weights: the one description that modules build from and the planner reads.

A policy-gradient run (PPO, the critic-free stages) holds up to four roles (InstructGPT §3.5):

* **policy** — always: a :class:`~lit_rlhf.hf.specs.ModelSpec`, trained;
* **reference** — ``explicit`` (its own spec), ``disabled_adapter`` (a LoRA policy with its adapter off: no
  second copy, TRL's convention), ``copy`` (a frozen copy of a full policy) or ``base`` (a shared base with
  every adapter off);
* **value** — ``critic`` (its own spec), ``value_head`` (a scalar head on the policy), ``adapter`` (a critic
  adapter of a shared base) or ``None`` (critic-free);
* **reward** — ``model`` (its own spec, any tokenizer), ``adapter`` (a reward adapter of a shared base) or
  ``function`` (``reward.fn``).

DPO holds a policy and a reference (``explicit``, ``disabled_adapter``, ``copy``, or ``None`` for the
reference-free SimPO). Which reference a LoRA policy gets is read when asked, not when the object is built:
:class:`~lit_rlhf.callbacks.LoRAQuantization` may give the policy LoRA after the module's ``__init__``
(it edits the specs in place, before ``configure_model``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from lit_rlhf.hf.specs import ModelSpec

__all__ = ["Roles"]

ReferenceSource = Literal["explicit", "disabled_adapter", "copy", "base"]
ValueSource = Literal["critic", "value_head", "adapter"]
RewardSource = Literal["model", "adapter", "function"]


@dataclass
class Roles:
    """The roles of one run, built once from the configuration (:meth:`policy_gradient`, :meth:`preference`).

    Args:
        policy: the trained model's spec.
        reference: an explicit reference spec, or ``None`` (derived: see :attr:`reference_source`).
        critic: a critic spec (PPO with a separate critic).
        reward_model: a reward model spec.
        value_head: a scalar value head on the policy instead of a critic.
        reward_fn: scores come from a Python ``reward.fn``.
        shared_base: every role on the policy's base as LoRA adapters (``reward_adapter``: the reward one).
        reward_adapter: folder of the shared base's reward adapter (``None``: ``reward.fn`` scores).
        value_function: the algorithm learns a value function (PPO) or not (critic-free, DPO).
        uses_reference: the run needs a reference at all (False: SimPO).
    """

    policy: ModelSpec
    reference: ModelSpec | None = None
    critic: ModelSpec | None = None
    reward_model: ModelSpec | None = None
    value_head: bool = False
    reward_fn: bool = False
    shared_base: bool = False
    reward_adapter: str | None = None
    value_function: bool = True
    uses_reference: bool = True
    #: the spec a frozen copy of a full policy loads from, made once so that a callback can edit it by role name
    reference_copy: ModelSpec | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.reference is None and self.uses_reference and not self.shared_base:
            self.reference_copy = replace(self.policy, lora=None)

    # ---- constructors ---------------------------------------------------------------------------------------
    @classmethod
    def policy_gradient(
        cls,
        policy: ModelSpec,
        critic: ModelSpec | None = None,
        reward_model: ModelSpec | None = None,
        reference: ModelSpec | None = None,
        value_head: bool = False,
        shared_base: bool = False,
        reward_adapter: str | None = None,
        reward_fn: bool = False,
        value_function: bool = True,
        stage: str = "PPOModule",
    ) -> Roles:
        """The roles of PPO (``value_function=True``) or a critic-free stage, checked: exactly one score source
        and, with a value function, exactly one of ``critic`` / ``value_head``; a shared base takes none of
        ``critic``, ``reward_model``, ``reference``, ``value_head``. ``stage`` names the module in errors."""
        if shared_base:
            given = [n for n, v in (("critic", critic), ("reward_model", reward_model), ("reference", reference)) if v]
            if value_head:
                given.append("value_head")
            if given:
                raise ValueError(f"shared_base puts every role on the policy's base: remove {', '.join(given)}.")
            if (reward_adapter is None) == (not reward_fn):
                raise ValueError(
                    f"{stage} needs exactly one score source: `shared_base.reward_adapter` or `reward.fn`."
                )
        elif (reward_model is None) == (not reward_fn):
            raise ValueError(f"{stage} needs exactly one score source: `reward_model` or `reward.fn`.")
        elif value_function and (critic is None) != value_head:
            raise ValueError(f"{stage} needs exactly one value function: `critic` or `value_head: true`.")
        return cls(
            policy=policy,
            reference=reference,
            critic=critic,
            reward_model=reward_model,
            value_head=value_head and value_function,
            reward_fn=reward_fn,
            shared_base=shared_base,
            reward_adapter=reward_adapter,
            value_function=value_function,
        )

    @classmethod
    def preference(cls, policy: ModelSpec, reference: ModelSpec | None, uses_reference: bool = True) -> Roles:
        """The roles of DPO and its variants: a policy and, unless the loss is reference-free, a reference."""
        return cls(policy=policy, reference=reference, value_function=False, uses_reference=uses_reference)

    # ---- what the run holds ---------------------------------------------------------------------------------
    @property
    def reference_source(self) -> ReferenceSource | None:
        """Where the reference's log-probs come from (``None``: the run has no reference)."""
        if not self.uses_reference:
            return None
        if self.shared_base:
            return "base"
        if self.reference is not None:
            return "explicit"
        return "disabled_adapter" if self.policy.lora is not None else "copy"

    @property
    def value_source(self) -> ValueSource | None:
        """Where the values come from (``None``: no value function)."""
        if not self.value_function:
            return None
        if self.shared_base:
            return "adapter"
        return "critic" if self.critic is not None else "value_head"

    @property
    def reward_source(self) -> RewardSource | None:
        """Where the scores come from (``None``: a stage without scores, DPO)."""
        if self.reward_fn:
            return "function"
        if self.shared_base and self.reward_adapter is not None:
            return "adapter"
        return "model" if self.reward_model is not None else None

    @property
    def loads_reference(self) -> bool:
        """Whether the reference is a model of its own (an explicit spec or a frozen copy)."""
        return self.reference_source in ("explicit", "copy")

    @property
    def trainable(self) -> tuple[str, ...]:
        """Role names whose spec is trained (what LoRAQuantization changes when no roles are named)."""
        return ("policy", "critic") if self.critic is not None else ("policy",)

    def specs(self) -> dict[str, ModelSpec]:
        """Role name → spec of every model with a spec of its own (the module's ``model_specs()``). The same
        :class:`ModelSpec` objects each time, so an edit by role name reaches the model that is built."""
        specs = {"policy": self.policy}
        reference = self.reference if self.reference is not None else self.reference_copy
        if reference is not None:
            specs["reference"] = reference
        if self.critic is not None:
            specs["critic"] = self.critic
        if self.reward_model is not None:
            specs["reward_model"] = self.reward_model
        return specs

    def describe(self) -> str:
        """One line per role, e.g. ``reference: the policy with its adapter disabled``."""
        reference = {
            "explicit": f"{self.reference.name_or_path if self.reference else ''} (frozen)",
            "disabled_adapter": "the policy with its adapter disabled",
            "copy": "a frozen copy of the policy",
            "base": "the shared base with every adapter disabled",
            None: "none",
        }[self.reference_source]
        value = {
            "critic": f"critic {self.critic.name_or_path if self.critic else ''}",
            "value_head": "a value head on the policy",
            "adapter": "a critic adapter of the shared base",
            None: "none",
        }[self.value_source]
        reward = {
            "model": f"reward model {self.reward_model.name_or_path if self.reward_model else ''}",
            "adapter": f"reward adapter {self.reward_adapter} of the shared base",
            "function": "reward.fn",
            None: "none",
        }[self.reward_source]
        lines = [f"policy: {self.policy.name_or_path}", f"reference: {reference}"]
        if self.value_function:
            lines.append(f"value: {value}")
        if self.reward_source is not None:
            lines.append(f"reward: {reward}")
        return "\n".join(lines)
