"""PPO experience: the stage's configuration, sampling, per-token forward passes, the :class:`Rollout` record.

Shapes: ``B`` prompts in the rollout batch (this process), ``P`` prompt length (left-padded), ``T`` response
length, ``L = P + T``, ``V`` vocabulary size, ``H`` hidden size.

Alignment (spec §1, pitfall P3): the logits that score response token ``t`` sit at sequence index
``P - 1 + t``, so ``logits[:, P - 1 : -1]`` scores ``responses[:, 0:]``; values use the same slice, so
``V[t] = V(s_t)``, the state *before* emitting ``y_t``. Every forward pass gets position ids from the
attention mask (pitfall P5); ``generate`` computes its own from the mask and gets none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from lit_rlhf.datamodules.base import DataError, pad_sequences, read_rows, require_str
from lit_rlhf.datamodules.sft import IGNORE_INDEX, tokenize_prompt_completion
from lit_rlhf.hf.scoring import position_ids_from_mask, reward_normalization, token_scores
from lit_rlhf.imports import import_callable
from lit_rlhf.rlhf import first_true_indices, truncate_after_eos

RewardFn = Callable[[list[str], list[str]], "list[float] | Tensor"]


@dataclass
class SamplingConfig:
    """How rollouts are sampled (every setting is passed to ``generate`` explicitly)."""

    max_new_tokens: int = 32
    """Response length limit ``T``; a response cut here gets the score on its last token."""
    temperature: float = 1.0
    """Sampling temperature; every log-prob and the KL use ``logits / temperature`` too."""
    top_k: int = 0
    """0 disables top-k, so the sampled distribution is exactly ``softmax(logits / T)``."""
    top_p: float = 1.0
    """1.0 disables nucleus sampling."""


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


@dataclass
class KLConfig:
    """The KL penalty to the reference policy."""

    coef: float = 0.05
    """β, or its initial value for the adaptive controller (InstructGPT 0.02, TRL 0.05)."""
    estimator: Literal["k1", "k3"] = "k1"
    """Per-token estimator in the reward: k1 = log π − log π_ref (unbiased, may be < 0), k3 (≥ 0)."""
    target: float | None = None
    """Adaptive control (Ziegler et al.) towards this KL in **nats per sequence**; ``None`` = fixed β."""
    horizon: int = 10000
    """Adaptive controller horizon, in episodes (sampled responses)."""


@dataclass
class RewardConfig:
    """Where scores come from and how they are shaped before entering the reward."""

    fn: str | None = None
    """``"package.module:function"`` of ``fn(prompts, responses) -> scores`` (rule-based reward); used
    instead of a reward model. A callable can be given directly from Python."""
    normalize: bool = False
    """Whiten scores with running mean/std over all scores seen so far (checkpointed)."""
    clip: float | None = None
    """Clip scores (after normalisation) to ``[-clip, clip]``."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses that never emit EOS (TRL's "EOS trick")."""


@dataclass
class PTXConfig:
    """PPO-ptx (InstructGPT Eq. 2): a language-modelling loss on pretraining or SFT text, scaled by ``coef``,
    accumulated into every PPO optimizer step."""

    data: str
    """File or hub dataset: ``text_column`` rows (every token supervised) or prompt/completion rows
    (completion and EOS supervised, as in SFT)."""
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


class Rollout(NamedTuple):
    """One PPO iteration's experience. Frozen for all PPO epochs of the iteration (pitfall P14).

    Every field is a tensor whose first dimension is ``B``; ``select`` and ``trim`` keep the record
    consistent when rows or padding columns are dropped.
    """

    query_responses: Tensor
    """LongTensor ``[B, L]``: left-padded prompt, then the response (pad after the first EOS)."""
    attention_mask: Tensor
    """LongTensor ``[B, L]``: 1 on real prompt tokens and on response tokens up to and with the EOS."""
    responses: Tensor
    """LongTensor ``[B, T]``: response tokens, pad after the first EOS."""
    mask: Tensor
    """BoolTensor ``[B, T]``: response tokens that are actions (up to and with the first EOS)."""
    logprobs: Tensor
    """``[B, T]`` behaviour log-probs ``log_softmax(logits / T)`` at rollout time; 0 outside ``mask``."""
    ref_logprobs: Tensor
    """``[B, T]`` the same under the reference policy; 0 outside ``mask``."""
    values: Tensor
    """``[B, T]`` critic values at rollout time; 0 outside ``mask``."""
    scores: Tensor
    """``[B]`` sequence scores after shaping (normalisation, clipping, missing-EOS penalty)."""
    rewards: Tensor
    """``[B, T]`` per-token rewards ``-β·KL_t`` plus the score once, on the EOS (or last) token."""
    advantages: Tensor
    """``[B, T]`` GAE advantages, whitened over the rollout batch of all processes; 0 outside ``mask``."""
    returns: Tensor
    """``[B, T]`` value targets: raw (un-whitened) advantages + values (pitfall P13)."""

    @property
    def context_length(self) -> int:
        """``P``: the prompt part of ``query_responses``."""
        return self.query_responses.shape[1] - self.responses.shape[1]

    def select(self, index: Tensor | Sequence[int]) -> Rollout:
        """The rows ``index`` (a minibatch or micro-batch)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.responses.device)
        return Rollout(*(field[index] for field in self))

    def trim(self) -> Rollout:
        """Drop columns that are padding in every row: leading prompt pads and the tail after the longest
        response, so no forward pass runs over padding that no row needs."""
        lead, length = padding_bounds(self.attention_mask, self.mask, self.context_length)
        end = self.context_length + length
        fields = self._asdict()
        fields["query_responses"] = self.query_responses[:, lead:end]
        fields["attention_mask"] = self.attention_mask[:, lead:end]
        for name in ("responses", "mask", "logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
            fields[name] = fields[name][:, :length]
        return Rollout(**fields)


def padding_bounds(attention_mask: Tensor, mask: Tensor, context_length: int) -> tuple[int, int]:
    """``(lead, length)``: leading prompt columns that are padding in every row, and the longest response.

    Dropping all-padding columns changes nothing: position ids come from the mask and padded keys are
    masked out of attention.
    """
    prompt_has_token = attention_mask[:, :context_length].bool().any(0)
    lead = int(first_true_indices(prompt_has_token[None])[0])
    return min(lead, context_length - 1), max(int(mask.sum(-1).max()), 1)


def eos_masks(responses: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(sequence_lengths [B], mask [B, T], contains_eos [B])`` of responses, found from the first EOS.

    The EOS is a trained action and is inside the mask (pitfall P4); ``sequence_lengths`` is the index of
    the last action, i.e. the EOS, or ``T - 1`` without one (then the last token gets the score). Unlike
    :func:`lit_rlhf.rlhf.response_masks` (which ends a response at its first pad), a pad id that the policy
    *sampled* mid-response stays an action: it is a legal token of the vocabulary, and ending the response
    there would score and train on a prefix the policy did not stop at.
    """
    length = responses.shape[1]
    eos_index = first_true_indices(responses == eos_token_id)
    contains_eos = eos_index < length
    sequence_lengths = eos_index.clamp(max=length - 1)
    mask = torch.arange(length, device=responses.device) <= sequence_lengths[:, None]
    return sequence_lengths, mask, contains_eos


@torch.no_grad()
def sample_responses(
    policy: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    generation_kwargs: dict,
    seed: int,
    eos_token_id: int,
    pad_token_id: int,
) -> Tensor:
    """Sample one response per left-padded prompt with KV caching; truncate after the first EOS.

    Sampling uses its own seed inside a forked RNG, so it neither depends on nor disturbs the global RNG
    (resumed runs sample the same responses; other ranks pass other seeds, pitfall P21).

    Args:
        policy: causal LM (peft-wrapped or not).
        prompt_ids: LongTensor ``[B, P]``, left-padded.
        prompt_mask: ``[B, P]``, 1 on real tokens.
        generation_kwargs: every sampling setting, from :func:`lit_rlhf.hf.generation.sampling_kwargs`.
        seed: sampling seed of this process and iteration.
        eos_token_id: stop token.
        pad_token_id: written after the first EOS.

    Returns:
        LongTensor ``[B, T]`` with ``T <= max_new_tokens``.
    """
    was_training = policy.training
    # eval(): with gradient checkpointing, HF turns the KV cache off in train mode. Dropout is 0 either way.
    policy.eval()
    devices = [prompt_ids.device] if prompt_ids.is_cuda else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True, **generation_kwargs)
    finally:
        policy.train(was_training)
    return truncate_after_eos(out[:, prompt_ids.shape[1] :], eos_token_id, pad_token_id)


def response_logits(
    model: nn.Module,
    query_responses: Tensor,
    attention_mask: Tensor,
    response_length: int,
    hidden: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logits ``[B, T, V]`` scoring each response token (and the last hidden states ``[B, T, H]``).

    Only the last ``T + 1`` positions are projected to the vocabulary (``logits_to_keep``), so no
    ``[B, L, V]`` tensor is built for the prompt.
    """
    out = model(
        input_ids=query_responses,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=response_length + 1,
        output_hidden_states=hidden,
        use_cache=False,
    )
    states = out.hidden_states[-1][:, -response_length - 1 : -1] if hidden else None
    return out.logits[:, :-1], states


def critic_values(critic: nn.Module, query_responses: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
    """Values ``[B, T]`` of a separate critic (a sequence classifier), on the reward model's normalised scale.

    The critic is initialised from the reward-model export, whose normalisation (InstructGPT's bias that
    makes demonstrations score 0) lives in its config. Applying it here makes ``V`` start on the scale of
    the normalised scores it has to predict (pitfall P11) without editing the head's weights.
    """
    bias, scale = reward_normalization(critic)
    raw = token_scores(critic, query_responses, attention_mask)
    return (raw[:, -response_length - 1 : -1] - bias) / scale


def import_reward_fn(path: str) -> RewardFn:
    """Import ``"package.module:function"``, a callable ``(prompts, responses) -> scores``."""
    return import_callable(path)


class RunningMoments(nn.Module):
    """Running mean and variance of scalar scores (Chan et al.'s parallel update), kept in buffers.

    The buffers are part of the module's ``state_dict``, so they are checkpointed and restored with it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor, reduce_fn: Callable[[Tensor], Tensor]) -> None:
        """Add the scores ``x`` ``[B]`` of every process (``reduce_fn`` sums across processes)."""
        x = x.detach().to(torch.float64)
        n, total = reduce_fn(
            torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.sum()])
        )
        batch_mean = total / n
        batch_m2 = reduce_fn(((x - batch_mean) ** 2).sum())
        delta = batch_mean - self.mean
        count = self.count + n
        m2 = self.var * self.count + batch_m2 + delta**2 * self.count * n / count
        self.mean.copy_(self.mean + delta * n / count)
        self.var.copy_(m2 / count)
        self.count.copy_(count)

    def normalize(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        """``(x - mean) / sqrt(var + eps)`` in ``x``'s dtype."""
        return ((x.to(torch.float64) - self.mean) * torch.rsqrt(self.var + eps)).to(x.dtype)


# The configs are saved in checkpoints' hyper-parameters; allow them in `torch.load(weights_only=True)`.
torch.serialization.add_safe_globals([SamplingConfig, PPOConfig, KLConfig, RewardConfig, PTXConfig])


def ptx_examples(config: PTXConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` of every usable PTX row; labels are ``-100`` where no loss is taken."""
    examples = []
    for row in read_rows(config.data):
        if config.text_column in row.data:
            ids = tokenizer(require_str(row, config.text_column))["input_ids"] + [tokenizer.eos_token_id]
            labels = list(ids)
        else:
            prompt = require_str(row, config.prompt_column, allow_empty=True)
            ids, labels = tokenize_prompt_completion(tokenizer, prompt, require_str(row, config.completion_column))
        ids, labels = ids[: config.max_length], labels[: config.max_length]
        if any(label != IGNORE_INDEX for label in labels[1:]):
            examples.append((ids, labels))
    if not examples:
        raise DataError(f"{config.data}: no PTX example with a supervised token")
    return examples


def ptx_batch(examples: list[tuple[list[int], list[int]]], size: int, pad_token_id: int, seed: int) -> dict:
    """``size`` examples drawn with ``seed``, right-padded: ``input_ids``, ``attention_mask``, ``labels``."""
    generator = torch.Generator().manual_seed(seed)
    picked = [examples[i] for i in torch.randint(len(examples), (size,), generator=generator).tolist()]
    return {
        "input_ids": pad_sequences([ids for ids, _ in picked], pad_token_id),
        "attention_mask": pad_sequences([[1] * len(ids) for ids, _ in picked], 0),
        "labels": pad_sequences([labels for _, labels in picked], IGNORE_INDEX),
    }
