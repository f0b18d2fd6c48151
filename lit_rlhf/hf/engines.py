"""Rollout engines: the one place responses come from (docs/conventions.md#rollout-engines).

Every stage that samples (PPO and the critic-free stages, SFT samples and ``predict``, evaluation, labelling and
iterated RLHF) asks a :class:`RolloutEngine`; none calls ``generate`` itself. An engine is told once which policy
and tokenizer it serves (:meth:`~RolloutEngine.bind`), is given the new weights after every update that changes
the policy (:meth:`~RolloutEngine.sync_weights`), and is closed at the end (:meth:`~RolloutEngine.close`).

:class:`HFEngine` samples the live module with transformers' ``generate`` through the one sampler
(:mod:`lit_rlhf.hf.generation`): exactly ``softmax(logits / T)``, seeded without side effects, the checkpoint's
``generation_config`` ignored. Because it samples the very module being trained, its :meth:`sync_weights` has
nothing to copy. An engine that keeps its own copy of the weights (an inference server) copies them there.

A new engine is one subclass: implement :meth:`~RolloutEngine.generate` (and :meth:`~RolloutEngine.sync_weights`
when it holds its own weights); choose it in YAML with ``engine: {class_path: my.module.MyEngine}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_rlhf.hf.generation import SamplingConfig, sample_many, sample_responses
from lit_rlhf.rlhf.padding import pad_batch, pad_sequences

__all__ = ["Generation", "HFEngine", "RolloutEngine"]


@dataclass(frozen=True)
class Generation:
    """What an engine returns for ``B`` prompts."""

    responses: Tensor
    """LongTensor ``[B, T]``, ``T <= max_new_tokens``: pad after each response's first EOS."""
    logprobs: Tensor | None = None
    """``[B, T]`` the engine's own log-probs of the sampled tokens (0 after the EOS), when it reports them;
    the trainer still recomputes its own (docs/conventions.md#rollout-engines)."""


class RolloutEngine(ABC):
    """Where responses come from. Subclasses implement :meth:`generate`; see the module docstring.

    The contract a trainer relies on: ``generate`` samples from the weights of the last :meth:`sync_weights` (or
    :meth:`bind`), at ``sampling``'s settings and nothing else, reproducibly for a given ``seed``, without
    touching the global RNG; a response ends at its first EOS and is padded after it.
    """

    def __init__(self) -> None:
        self.policy: nn.Module | None = None
        self.eos_token_id: int | None = None
        self.pad_token_id: int | None = None
        self.synced_gpus = False
        #: seconds the last :meth:`sync_weights` took, for the trainer to log (``None``: nothing was copied)
        self.last_sync_seconds: float | None = None
        #: the engine's own check of the last sync, in nats (``None``: no check)
        self.last_sync_gap: float | None = None

    @property
    def is_bound(self) -> bool:
        return self.policy is not None

    def bind(self, policy: nn.Module, tokenizer, *, synced_gpus: bool = False) -> None:
        """Serve ``policy`` with ``tokenizer``'s EOS (the stop token) and pad token.

        ``synced_gpus``: every process calls :meth:`generate` together and the weights are sharded (FSDP,
        DeepSpeed ZeRO-3), so no process may stop its forwards early.
        """
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("a rollout engine needs a tokenizer with an EOS and a pad token (load_tokenizer adds one)")
        self.policy = policy
        self.eos_token_id, self.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.synced_gpus = synced_gpus
        self.sync_weights(policy)

    def sync_weights(self, policy: nn.Module) -> None:
        """Make the next :meth:`generate` sample from ``policy``'s current weights; called after every update that
        changes them. The default keeps a reference to the live module (nothing to copy)."""
        self.policy = policy

    @abstractmethod
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig, seed: int) -> Generation:
        """Sample one response per prompt.

        Args:
            prompt_ids: LongTensor ``[B, P]``, left-padded, on the policy's device.
            prompt_mask: ``[B, P]``, 1 on real tokens.
            sampling: every sampling setting (nothing else may change the sampled distribution).
            seed: the seed of this call (this process, this iteration).

        Returns:
            :class:`Generation` with ``responses`` ``[B, T]`` on the prompts' device.
        """

    def generate_many(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, seed: int, batch_size: int = 32
    ) -> Tensor:
        """One response per prompt (token id lists, any number), in left-padded batches of ``batch_size``.

        Returns:
            LongTensor ``[N, T]`` on the CPU, padded after each response's first EOS.
        """
        device = self._device()
        chunks = []
        for i, start in enumerate(range(0, len(prompts), batch_size)):
            ids, mask = pad_batch(prompts[start : start + batch_size], self.pad_token_id, side="left")
            chunks.append(self.generate(ids.to(device), mask.to(device), sampling, seed + i).responses.cpu())
        return pad_sequences([row.tolist() for chunk in chunks for row in chunk], self.pad_token_id)

    def close(self) -> None:
        """Release what the engine holds (processes, memory); it must be bound again before further use."""
        self.policy = None

    def _device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def _require_bound(self) -> None:
        if not self.is_bound:
            raise RuntimeError(f"{type(self).__name__} is not bound to a policy: call bind(policy, tokenizer) first")


class HFEngine(RolloutEngine):
    """Transformers' ``generate`` on the live policy module, with KV cache (:mod:`lit_rlhf.hf.generation`).

    ``generate_many`` continues one random stream over its batches (one seed for the whole list), as labelling
    samples; evaluation calls :meth:`generate` once per batch, batch ``k`` with ``seed + k``
    (docs/conventions.md#sampling-seeds)."""

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig, seed: int) -> Generation:
        self._require_bound()
        responses = sample_responses(
            self.policy,
            prompt_ids,
            prompt_mask,
            sampling,
            seed,
            self.eos_token_id,
            self.pad_token_id,
            synced_gpus=self.synced_gpus,
        )
        return Generation(responses)

    def generate_many(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, seed: int, batch_size: int = 32
    ) -> Tensor:
        self._require_bound()
        return sample_many(self.policy, prompts, sampling, seed, self.eos_token_id, self.pad_token_id, batch_size)
