"""One base model for all four PPO roles: named LoRA adapters switched per forward pass.

A 7-8B PPO run holds four networks (policy, reference, critic, reward model). Here the base weights are loaded
**once** (any dtype, or 4-bit) and carry three peft LoRA adapters (docs/conventions.md#shared-base-ppo):

========================  =================================================  ===========
role                      what runs                                          trained
========================  =================================================  ===========
policy                    base + ``policy`` adapter + the LM head            yes
reference                 base, every adapter disabled                       no
critic                    base + ``critic`` adapter + scalar value head      yes
reward model              base + ``reward_model`` adapter + its score head   no
========================  =================================================  ===========

The reward adapter and its score head come from a reward model trained with LoRA on the same base and exported
unmerged (``HFExport(merge_adapters: false)``; :func:`~lit_rlhf.hf.export.save_pretrained_atomic`).

Two peft behaviours are handled here:

* ``set_adapter`` and ``disable_adapter`` rewrite ``requires_grad`` (the active adapter becomes trainable, the
  others frozen). :class:`SharedBase` restores its fixed map after every switch, so the reward adapter never
  trains and the critic adapter keeps receiving gradients while the policy adapter is active, and vice versa.
* Gradient checkpointing recomputes a layer during ``backward``, when another adapter may be active; the
  recomputation therefore runs under the adapter that was active in the forward pass (``context_fn`` of
  ``torch.utils.checkpoint``), else the critic's gradients would be computed through the policy adapter.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import MethodType, SimpleNamespace
from typing import Literal

import torch
from torch import Tensor, nn

from lit_rlhf.hf.export import merged_model, read_reward_normalization, save_active_adapter, write_reward_normalization
from lit_rlhf.hf.loading import load_model, lora_config, unwrap_peft
from lit_rlhf.hf.sharding import full_state_dict, is_sharded
from lit_rlhf.hf.specs import LoraSpec, ModelSpec
from lit_rlhf.outputs import replace_dir

log = logging.getLogger(__name__)

POLICY, CRITIC, REWARD = "policy", "critic", "reward_model"
#: the key prefix under which peft saves a sequence classifier's ``score`` head (``modules_to_save``)
_HEAD_PREFIX = "base_model.model.score."
CriticInit = Literal["reward_model", "zero"]


class SharedBase:
    """Switches the adapters of one peft model while keeping which adapters train fixed.

    Args:
        model: a peft model carrying the adapters named in ``trainable``.
        trainable: adapter name → whether its weights train.
    """

    def __init__(self, model: nn.Module, trainable: dict[str, bool]) -> None:
        self.model = model
        self.trainable = dict(trainable)
        self._disabled = False
        for name, param in model.named_parameters():
            adapter = _adapter_of(name, self.trainable)
            param.requires_grad_(adapter is not None and self.trainable[adapter])
        # by owner and name, not by tensor: FSDP2 replaces every parameter (its shard, and the gathered weight in
        # each forward), so the flags are set on whichever tensor the module holds at the time
        self._flags = [
            (module, name, param.requires_grad)
            for module in model.modules()
            for name, param in module.named_parameters(recurse=False)
        ]

    def _restore_flags(self) -> None:
        for module, name, flag in self._flags:
            param = getattr(module, name)
            if param.requires_grad != flag:
                param.requires_grad_(flag)

    @property
    def active_adapter(self) -> str | None:
        """The adapter forward passes run through; ``None`` inside :meth:`no_adapter`."""
        return None if self._disabled else self.model.active_adapter

    @contextlib.contextmanager
    def active(self, adapter: str) -> Iterator[None]:
        """Run the block through ``adapter`` (the previously active one afterwards)."""
        if adapter not in self.trainable:
            raise KeyError(f"no adapter {adapter!r} on the shared base; it has {sorted(self.trainable)}")
        if self._disabled:
            raise RuntimeError("cannot switch adapters inside no_adapter()")
        previous = self.model.active_adapter
        if previous == adapter:
            yield
            return
        self.model.set_adapter(adapter)
        self._restore_flags()
        try:
            yield
        finally:
            self.model.set_adapter(previous)
            self._restore_flags()

    @contextlib.contextmanager
    def no_adapter(self) -> Iterator[None]:
        """Run the block through the base weights alone (the reference policy)."""
        if self._disabled:
            yield
            return
        try:
            with self.model.disable_adapter():
                self._disabled = True
                self._restore_flags()
                yield
        finally:
            self._disabled = False
            self._restore_flags()

    def _as_recorded(self, adapter: str | None) -> contextlib.AbstractContextManager:
        return self.no_adapter() if adapter is None else self.active(adapter)

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` for ``torch.utils.checkpoint``: recompute under the adapter of the forward pass."""
        return contextlib.nullcontext(), self._as_recorded(self.active_adapter)

    def enable_gradient_checkpointing(self) -> None:
        """(Re-)enable non-reentrant checkpointing on every decoder layer with :meth:`checkpoint_contexts`."""
        kwargs = {"use_reentrant": False, "context_fn": self.checkpoint_contexts}
        unwrap_peft(self.model).activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)

    def on_sharded(self, activation_checkpointing: bool) -> None:
        """After FSDP2 has sharded the base (:func:`~lit_rlhf.hf.sharding.shard_model`): route the adapter roles'
        forwards through the root's hooks, and, when the strategy checkpoints activations, checkpoint with
        :meth:`checkpoint_contexts` again (``shard_model`` enabled plain checkpointing, whose recomputation
        would run under whichever adapter is active during the backward)."""
        from torch.distributed.fsdp import register_fsdp_forward_method

        hf = unwrap_peft(self.model)
        # The adapter roles need the decoder's hidden states without the LM head, but the root (the transformers
        # model, which holds the embeddings, the final norm and the LM head; a tied LM head is the embedding)
        # gathers its weights only around `forward`. FSDP2 runs its pre/post-forward hooks, and their backward
        # bookkeeping, around a method registered with it as well: a method of the root that calls the decoder.
        setattr(hf, _HIDDEN_STATES, MethodType(_decoder_last_hidden_state, hf))
        register_fsdp_forward_method(hf, _HIDDEN_STATES)
        if activation_checkpointing:
            self.enable_gradient_checkpointing()


def _adapter_of(param_name: str, adapters) -> str | None:
    """The adapter a LoRA parameter belongs to (``...q_proj.lora_A.<adapter>.weight``), ``None`` for base weights."""
    parts = param_name.split(".")
    for part, following in zip(parts, parts[1:], strict=False):
        if part.startswith("lora_") and following in adapters:
            return following
    return None


#: the method :meth:`SharedBase.on_sharded` gives a sharded base: :func:`_decoder_last_hidden_state` under FSDP2's hooks
_HIDDEN_STATES = "lit_rlhf_decoder_hidden_states"


def _decoder_last_hidden_state(
    hf: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor
) -> Tensor:
    out = hf.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state


def decoder_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
    """Last hidden states ``[B, L, H]`` (after the final norm) of a causal LM's decoder, without the LM head.

    On an FSDP2-sharded base, through the root method :meth:`SharedBase.on_sharded` registered (the same call,
    with the root's weights gathered around it)."""
    hf = unwrap_peft(model)
    sharded = getattr(hf, _HIDDEN_STATES, None)
    if sharded is not None:
        return sharded(input_ids, attention_mask, position_ids)
    return _decoder_last_hidden_state(hf, input_ids, attention_mask, position_ids)


class AdapterRole(nn.Module):
    """One adapter of a :class:`SharedBase` with its scalar head, called like a decoder sequence classifier.

    :func:`~lit_rlhf.hf.scoring.sequence_scores`, :func:`~lit_rlhf.hf.scoring.token_scores` and
    :func:`~lit_rlhf.hf.forwards.critic_values` read it as they read a separate reward model or critic: its
    ``score`` head is applied to the hidden states it returns, and ``config.reward_bias``/``reward_scale`` hold
    the normalisation. The base model is not a sub-module (it belongs to the policy role, and is saved once).

    Args:
        shared: the adapter switcher.
        adapter: which adapter this role runs through.
        head: ``nn.Linear(H, 1)``.
        bias, scale: reward normalisation (``(raw - bias) / scale``).
    """

    def __init__(self, shared: SharedBase, adapter: str, head: nn.Linear, bias: float, scale: float) -> None:
        super().__init__()
        self.score = head
        self.adapter = adapter
        self.config = SimpleNamespace(reward_bias=float(bias), reward_scale=float(scale))
        self._shared = [shared]  # a list, so nn.Module does not register the base as a sub-module

    @property
    def shared(self) -> SharedBase:
        return self._shared[0]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The LoRA weights of this role's adapter."""
        return [
            p for n, p in self.shared.model.named_parameters() if _adapter_of(n, self.shared.trainable) == self.adapter
        ]

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None, **_
    ) -> SimpleNamespace:
        """``hidden_states``: a 1-tuple holding the last hidden states ``[B, L, H]`` under this role's adapter."""
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with self.shared.active(self.adapter):
            hidden = decoder_hidden_states(self.shared.model, input_ids, attention_mask, position_ids)
        return SimpleNamespace(hidden_states=(hidden,))


def load_shared_base(
    spec: ModelSpec,
    tokenizer,
    reward_adapter: str | os.PathLike | None,
    critic_init: CriticInit | None = "reward_model",
    critic_lora: LoraSpec | None = None,
    device: torch.device | str | None = None,
) -> tuple[SharedBase, AdapterRole | None, AdapterRole | None]:
    """Load ``spec`` once with the ``policy`` adapter (``spec.lora``), a ``critic`` adapter and the reward adapter.

    Args:
        spec: the base (dtype, 4-bit, gradient checkpointing) and the policy's LoRA.
        tokenizer: the policy's tokenizer (from :func:`~lit_rlhf.hf.loading.load_tokenizer`).
        reward_adapter: unmerged LoRA reward-model export trained on the same base, or ``None`` (``reward.fn``).
        critic_init: ``reward_model`` copies the reward adapter, head and normalisation into the critic;
            ``zero`` adds a fresh adapter (``critic_lora``, default ``spec.lora``) and a zero value head;
            ``None``: no critic (critic-free RL).
        critic_lora: the critic adapter for ``critic_init="zero"``.
        device: where 4-bit weights are placed at load time.

    Returns:
        ``(shared, critic, reward_model)`` (``critic`` is ``None`` without one); ``shared.model`` is the policy
        (its adapter active by default).
    """
    if spec.lora is None:
        raise ValueError("a shared base needs the policy's LoRA spec (policy.lora)")
    if spec.lora.bias != "none" or (critic_lora is not None and critic_lora.bias != "none"):
        # a trained bias would be a base weight, shared by every role: the reference would move with the policy
        raise ValueError("a shared base trains adapters only: LoRA bias must be 'none'")
    reward = _read_reward_adapter(reward_adapter, spec) if reward_adapter is not None else None
    model = load_model(spec, tokenizer, "causal_lm", trainable=True, device=device, adapter_name=POLICY)
    hidden = unwrap_peft(model).config.hidden_size
    if reward is not None:
        config, lora_state, head_state, (bias, scale) = reward
        _add_adapter(model, REWARD, config, lora_state, spec)
    if critic_init is None:
        critic_head = None
    elif critic_init == "reward_model":
        if reward is None:
            raise ValueError("critic_init='reward_model' needs a reward adapter")
        _add_adapter(model, CRITIC, config, lora_state, spec)
        critic_head, critic_norm = _head(hidden, head_state), (bias, scale)
    else:
        config = lora_config(critic_lora or spec.lora, "causal_lm")
        _add_adapter(model, CRITIC, config, None, spec)
        critic_head, critic_norm = nn.Linear(hidden, 1), (0.0, 1.0)
        nn.init.zeros_(critic_head.weight)  # V ≡ 0 at start (OpenAI 2019) instead of random values
        nn.init.zeros_(critic_head.bias)
    model.set_adapter(POLICY)
    trainable = {POLICY: True, **({CRITIC: True} if critic_head is not None else {})}
    shared = SharedBase(model, {**trainable, **({REWARD: False} if reward is not None else {})})
    if spec.gradient_checkpointing:
        shared.enable_gradient_checkpointing()
    critic = AdapterRole(shared, CRITIC, critic_head, *critic_norm) if critic_head is not None else None
    reward_role = None
    if reward is not None:
        reward_role = AdapterRole(shared, REWARD, _head(hidden, head_state).requires_grad_(False), bias, scale)
    return shared, critic, reward_role


def _read_reward_adapter(path: str | os.PathLike, spec: ModelSpec):
    """``(LoraConfig, LoRA weights, score-head weights, (bias, scale))`` of an unmerged LoRA reward-model export."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    path = Path(path)
    weights_file = path / "adapter_model.safetensors"
    if not (path / "adapter_config.json").exists() or not weights_file.exists():
        raise FileNotFoundError(
            f"{path} is not an unmerged LoRA reward-model export (adapter_config.json, adapter_model.safetensors). "
            "Train the reward model with LoRA on the policy's base and export it with "
            "HFExport(merge_adapters: false)."
        )
    config = LoraConfig.from_pretrained(str(path))
    if not _same_base(config.base_model_name_or_path, spec.name_or_path):
        raise ValueError(
            f"reward adapter {str(path)!r} was trained on {config.base_model_name_or_path!r}, but the shared base is "
            f"{spec.name_or_path!r}: an adapter only means something on the weights it was trained on."
        )
    weights = load_file(str(weights_file))
    head_state = {k[len(_HEAD_PREFIX) :]: v for k, v in weights.items() if k.startswith(_HEAD_PREFIX)}
    if "weight" not in head_state:
        raise ValueError(
            f"{path}: the adapter holds no score head ({_HEAD_PREFIX}weight); export a reward model (task SEQ_CLS)."
        )
    lora_state = {k: v for k, v in weights.items() if not k.startswith(_HEAD_PREFIX)}
    normalization = read_reward_normalization(path)
    if normalization is None:
        log.warning("%s has no reward_normalization.json: scores are used unnormalised", path)
        normalization = (0.0, 1.0)
    return config, lora_state, head_state, normalization


def _same_base(adapter_base: str | None, base: str) -> bool:
    if adapter_base is None:
        return True  # peft leaves it unset for models built in memory; nothing to compare
    if os.path.exists(adapter_base) and os.path.exists(base):
        return os.path.realpath(adapter_base) == os.path.realpath(base)
    return adapter_base == base


def _add_adapter(model: nn.Module, name: str, config, lora_state: dict | None, spec: ModelSpec) -> None:
    from peft import set_peft_model_state_dict

    config = copy.deepcopy(config)
    config.task_type = "CAUSAL_LM"
    config.modules_to_save = None  # the heads are separate modules, not peft copies
    config.inference_mode = False
    if spec.dropout is not None:  # as for every other model (docs/conventions.md#dropout)
        config.lora_dropout = spec.dropout
    model.add_adapter(name, config)
    if lora_state is None:
        return
    result = set_peft_model_state_dict(model, lora_state, adapter_name=name)
    missing = [k for k in result.missing_keys if _adapter_of(k, {name}) == name]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"adapter {name!r} does not fit the base: unexpected {list(result.unexpected_keys)[:3]}, "
            f"missing {missing[:3]}"
        )


def _head(hidden: int, state: dict[str, Tensor]) -> nn.Linear:
    weight = state["weight"]
    if tuple(weight.shape) != (1, hidden):
        raise ValueError(f"score head of shape {tuple(weight.shape)} does not fit hidden size {hidden} (1 label)")
    head = nn.Linear(hidden, 1, bias="bias" in state)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if "bias" in state:
            head.bias.copy_(state["bias"].float())
    return head


def export_adapter_role(
    role: AdapterRole,
    tokenizer,
    dirpath: str | os.PathLike,
    spec: ModelSpec,
    merge_adapters: bool = True,
) -> Path:
    """Write an :class:`AdapterRole` (the trained critic) as a reward-model-style export.

    ``merge_adapters=True``: a ``*ForSequenceClassification`` folder (base merged with the adapter, the head as
    ``score``, the normalisation in ``config.json``), which a four-model PPO run loads as its ``critic``.
    ``False``: an unmerged adapter folder in the format of a LoRA reward-model export, which a shared-base run
    loads as ``shared_base.reward_adapter``. A head bias ``b`` is folded into the stored ``reward_bias``
    (``(w·h + b - bias) / scale = (w·h - (bias - b)) / scale``), so the values read back are the same.
    Under FSDP2 every process must call it (the weights are gathered to rank 0, which writes the folder).
    """
    from peft import PeftConfig
    from safetensors.torch import load_file, save_file

    dirpath = Path(dirpath)
    state_dict, head = None, {k: v.detach() for k, v in role.score.state_dict().items()}
    if is_sharded(role.shared.model):
        # FSDP2: every process gathers the base's weights (adapters included) and the head (the trained critic's
        # is sharded, a frozen reward head whole); rank 0 alone holds them and writes
        state_dict = full_state_dict(role.shared.model)
        head = {k[len("score.") :]: v for k, v in full_state_dict(role).items()}
        if torch.distributed.get_rank() != 0:
            return dirpath
    dirpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dirpath.name}.", dir=dirpath.parent))
    try:
        adapter_dir = tmp / "_adapter"
        with role.shared.active(role.adapter):
            save_active_adapter(role.shared.model, adapter_dir, state_dict)
        config = PeftConfig.from_pretrained(str(adapter_dir))
        config.task_type, config.modules_to_save = "SEQ_CLS", ["classifier", "score"]
        config.base_model_name_or_path = spec.name_or_path
        config.save_pretrained(str(adapter_dir))
        weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
        weights[_HEAD_PREFIX + "weight"] = head["weight"].float().cpu().contiguous()
        save_file(weights, str(adapter_dir / "adapter_model.safetensors"))
        head_bias = float(head["bias"]) if "bias" in head else 0.0
        norm = SimpleNamespace(reward_bias=role.config.reward_bias - head_bias, reward_scale=role.config.reward_scale)
        if merge_adapters:
            merged = merged_model(spec, tokenizer, "sequence_classifier", adapter_dir)
            merged.config.reward_bias, merged.config.reward_scale = norm.reward_bias, norm.reward_scale
            merged.save_pretrained(tmp, safe_serialization=True)
            shutil.rmtree(adapter_dir)
        else:
            for item in adapter_dir.iterdir():
                item.rename(tmp / item.name)
            adapter_dir.rmdir()
            write_reward_normalization(tmp, norm)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, dirpath)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dirpath
