"""Per-token RLHF rewards: KL penalty on every response token plus the sequence score once.

Notation for tensor shapes: ``B`` batch size, ``T`` response length.

InstructGPT objective (Ouyang et al. 2022, Eq. 2) as a per-token reward::

    r_t = −β · KL̂_t · m_t  +  1[t = score_index] · score
"""

from collections.abc import Callable

import torch
from torch import Tensor

from lit_rlhf.rlhf.moments import RunningMoments


def per_token_rewards(
    kl: Tensor,
    scores: Tensor,
    score_index: Tensor,
    kl_coef: float,
    mask: Tensor,
) -> tuple[Tensor, Tensor]:
    """Assemble the per-token reward from a per-token KL estimate and a sequence score.

    Where the score lands is the caller's choice (docs/conventions.md#where-the-score-lands):

    * this library (InstructGPT semantic, OpenRLHF): ``score_index = sequence_lengths``, i.e. the EOS token
      itself, or the last response token when there is no EOS;
    * TRL/N+ parity: ``score_index = (sequence_lengths + 1).clamp(max=T - 1)`` (TRL's ``actual_end``),
      a pseudo-step after the EOS that only the value loss sees (use TRL's ``~padding_mask_p1`` for values).

    Args:
        kl: ``[B, T]`` per-token KL estimate (:func:`lit_rlhf.rlhf.kl.kl_penalty`).
        scores: ``[B]`` reward-model scores (after any EOS penalty or normalisation).
        score_index: LongTensor ``[B]`` position at which each score is added, in ``[0, T)``.
        kl_coef: β.
        mask: ``[B, T]`` bool mask of response tokens that pay the KL penalty (``ResponseMasks.mask``).

    Returns:
        ``(rewards, non_score_rewards)``, both ``[B, T]``. ``non_score_rewards = −β · kl`` on the mask and 0
        elsewhere; ``rewards`` adds each score exactly once at ``score_index``.
    """
    non_score_rewards = torch.where(mask.bool(), -kl_coef * kl, 0)
    score_index = score_index.long().unsqueeze(-1)
    rewards = non_score_rewards.scatter_add(-1, score_index, scores.to(kl.dtype).unsqueeze(-1))
    return rewards, non_score_rewards


def apply_missing_eos_penalty(scores: Tensor, contains_eos: Tensor, penalty: float | None) -> Tensor:
    """Subtract ``penalty`` from the scores of responses without an EOS (TRL's ``missing_eos_penalty``).

    N+ and OpenAI's 2019 code instead *replace* such scores by −1; porting hyper-parameters between the two
    rules changes the reward scale (docs/conventions.md#missing-eos-penalty).

    Args:
        scores: ``[B]`` reward-model scores.
        contains_eos: BoolTensor ``[B]`` (``ResponseMasks.contains_eos``).
        penalty: Positive amount to subtract, or ``None`` to leave the scores unchanged.

    Returns:
        ``[B]`` scores (a new tensor when ``penalty`` is set, else ``scores`` itself).
    """
    if penalty is None:
        return scores
    return torch.where(contains_eos, scores, scores - penalty)


def shape_scores(
    scores: Tensor,
    contains_eos: Tensor,
    moments: RunningMoments | None = None,
    clip: float | None = None,
    missing_eos_penalty: float | None = None,
    reduce_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """A policy-gradient stage's score shaping, in this order: running normalisation (``moments`` updated with
    these scores over every process, ``reduce_fn``), clipping to ``[-clip, clip]``, then the missing-EOS penalty
    (in normalised units).

    Args:
        scores: ``[B]`` raw scores. contains_eos: BoolTensor ``[B]``.
        moments: running statistics to update and whiten with; ``None`` = no normalisation.
        clip, missing_eos_penalty: see :func:`apply_missing_eos_penalty`; ``None`` = off.
        reduce_fn: sum over processes for the running statistics; ``None`` = this process.

    Returns:
        ``[B]`` shaped scores.
    """
    if moments is not None:
        moments.update(scores, reduce_fn or (lambda x: x))
        scores = moments.normalize(scores)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return apply_missing_eos_penalty(scores, contains_eos, missing_eos_penalty)
