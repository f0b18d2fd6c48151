"""Direct preference optimisation losses: DPO (sigmoid), conservative DPO, IPO and reference-free SimPO.

Notation for tensor shapes: ``N`` preference pairs, ``B`` prompts, ``K`` responses per prompt.

Inputs are **per-sequence** log-probabilities of a response given its prompt, ``log π(y|x) = Σ_t log π(y_t|x,
y_<t)`` summed over the response tokens (EOS included), and the number of those tokens. The losses follow the
papers as TRL implements them (docs/conventions.md#dpo-losses):

* ``sigmoid`` (Rafailov et al. 2023, Eq. 7): ``−log σ(β·Δ)`` with ``Δ = (log π_c − log π_ref,c) −
  (log π_r − log π_ref,r)``. With ``label_smoothing = ε > 0`` it is conservative DPO (cDPO, Mitchell 2023):
  ``−(1 − ε)·log σ(β·Δ) − ε·log σ(−β·Δ)``, TRL 0.x's ``sigmoid`` and TRL 1.x ``CPOTrainer``'s formula;
* ``ipo`` (Azar et al. 2023, Eq. 17): ``(Δ̄ − 1/(2β))²`` where ``Δ̄`` uses log-ratios **averaged** over each
  response's tokens (TRL 1.x ``DPOTrainer``, confirmed with the IPO authors there);
* ``simpo`` (Meng et al. 2024, Eq. 6): reference-free, ``−log σ(β·(ℓ̄_c − ℓ̄_r) − γ)`` on length-averaged
  log-probs ``ℓ̄ = log π(y|x) / |y|``, with label smoothing as in TRL's ``CPOTrainer(loss_type="simpo")``.

The implicit rewards (TRL's ``rewards/chosen``, ``rewards/rejected``) are ``β·(log π − log π_ref)`` for DPO
and IPO and ``β·ℓ̄`` for SimPO.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

PreferenceLossType = Literal["sigmoid", "ipo", "simpo"]
#: loss types that need reference log-probs
REFERENCE_LOSSES: tuple[str, ...] = ("sigmoid", "ipo")


class PreferenceLossOutput(NamedTuple):
    """Result of the pairwise preference losses; every field but ``losses`` is detached."""

    losses: Tensor
    """``[N]`` loss of each pair (TRL's loss is their mean)."""
    chosen_rewards: Tensor
    """``[N]`` implicit reward of the preferred response."""
    rejected_rewards: Tensor
    """``[N]`` implicit reward of the dispreferred response."""


def _smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}.")


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """DPO's sigmoid loss ``−log σ(β·Δ)``, or conservative DPO with ``label_smoothing`` ε.

    Args:
        chosen_logps: ``[N]`` summed response log-probs of the preferred responses under the policy.
        rejected_logps: ``[N]`` the same for the dispreferred responses.
        ref_chosen_logps: ``[N]`` summed log-probs of the preferred responses under the reference.
        ref_rejected_logps: ``[N]`` the same for the dispreferred responses.
        beta: β, the strength of the implicit KL regularisation (TRL default 0.1).
        label_smoothing: ε, the assumed probability that a label is flipped (cDPO); 0 is plain DPO.

    Returns:
        :class:`PreferenceLossOutput` with rewards ``β·(log π − log π_ref)``.
    """
    _check_label_smoothing(label_smoothing)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    losses = _smoothed_sigmoid_loss(beta * (chosen_logratios - rejected_logratios), label_smoothing)
    return PreferenceLossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def ipo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """IPO's squared loss ``(Δ̄ − 1/(2β))²`` on per-token averaged log-ratios (β is the paper's τ).

    Args:
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[N]`` as in :func:`dpo_loss`.
        chosen_lengths: ``[N]`` response tokens of the preferred responses (the averaging length, ≥ 1).
        rejected_lengths: ``[N]`` the same for the dispreferred responses.
        beta: τ; the loss pulls the averaged log-ratio margin towards ``1/(2τ)``.

    Returns:
        :class:`PreferenceLossOutput` with rewards ``β·(log π − log π_ref)`` (summed, as TRL logs them).
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    losses = (delta - 1 / (2 * beta)) ** 2
    return PreferenceLossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """SimPO: ``−log σ(β·(ℓ̄_c − ℓ̄_r) − γ)`` with ``ℓ̄ = log π(y|x) / |y|``, no reference model.

    Args:
        chosen_logps, rejected_logps: ``[N]`` summed response log-probs under the policy.
        chosen_lengths, rejected_lengths: ``[N]`` response tokens (≥ 1).
        beta: β (the paper uses 2–2.5; TRL's CPO default 0.1).
        gamma: γ, the target reward margin (TRL's ``simpo_gamma``, default 0.5).
        label_smoothing: ε as in :func:`dpo_loss` (TRL ``CPOTrainer``).

    Returns:
        :class:`PreferenceLossOutput` with rewards ``β·ℓ̄``.
    """
    _check_label_smoothing(label_smoothing)
    chosen_avg = chosen_logps / chosen_lengths.clamp(min=1)
    rejected_avg = rejected_logps / rejected_lengths.clamp(min=1)
    losses = _smoothed_sigmoid_loss(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    return PreferenceLossOutput(losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())


def preference_pair_losses(
    loss_type: PreferenceLossType,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
) -> PreferenceLossOutput:
    """Dispatch to :func:`dpo_loss`, :func:`ipo_loss` or :func:`simpo_loss` (all tensors ``[N]``).

    Returns:
        :class:`PreferenceLossOutput`.

    Raises:
        ValueError: an unknown ``loss_type``, missing reference log-probs for ``sigmoid``/``ipo``, or label
            smoothing with ``ipo``.
    """
    if loss_type == "simpo":
        return simpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta, gamma, label_smoothing)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type={loss_type!r} needs reference log-probs.")
    if loss_type == "sigmoid":
        return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing)
    if loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid and simpo losses, not to ipo.")
        return ipo_loss(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths, beta
        )
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of 'sigmoid', 'ipo', 'simpo'.")


class KwisePreferenceOutput(NamedTuple):
    """Result of :func:`kwise_preference_loss`; every field but ``loss_sum`` is detached."""

    loss_sum: Tensor
    """Scalar: Σ over prompts with ≥ 1 valid pair of the prompt's mean pair loss (divide by the prompts of the
    whole optimizer step)."""
    per_prompt_loss: Tensor
    """``[B]``: mean loss over the prompt's valid pairs (0 for prompts without any)."""
    num_pairs: Tensor
    """LongTensor ``[B]``: valid (non-tied, non-padded) pairs per prompt."""
    prompt_index: Tensor
    """LongTensor ``[N]``: the prompt of each pair (pairs in ``(prompt, winner, loser)`` order)."""
    pair: PreferenceLossOutput
    """The ``[N]`` per-pair losses and implicit rewards."""


def ranked_pairs(ranks: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every ordered pair of a prompt's responses with ``ranks[w] < ranks[l]`` (ties and padded slots dropped,
    InstructGPT App. C.2).

    Args:
        ranks: ``[B, K]`` ranks, lower is better; equal ranks are ties.
        response_mask: BoolTensor ``[B, K]``, False on padded response slots.

    Returns:
        ``(prompt, winner, loser)``: LongTensors ``[N]`` in row-major ``(b, w, l)`` order.
    """
    real = response_mask.bool()
    valid = (ranks.unsqueeze(-1) < ranks.unsqueeze(-2)) & real.unsqueeze(-1) & real.unsqueeze(-2)
    prompt, winner, loser = valid.nonzero(as_tuple=True)
    return prompt, winner, loser


def kwise_preference_loss(
    loss_type: PreferenceLossType,
    logps: Tensor,
    lengths: Tensor,
    ranks: Tensor,
    response_mask: Tensor,
    ref_logps: Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
) -> KwisePreferenceOutput:
    """A preference loss over every ``C(K, 2)`` non-tied pair of each prompt's ranking, from per-response
    log-probs computed once per response.

    Each prompt averages over its pairs, and prompts are summed (``loss_sum``): divided by the prompt count
    of the optimizer step, every prompt weighs the same whatever its ``K`` and number of ties, as in the
    reward model's InstructGPT loss (docs/conventions.md#k-wise-dpo). At ``K = 2`` it is the pairwise loss.

    Args:
        loss_type: ``sigmoid`` (DPO / cDPO), ``ipo`` or ``simpo``.
        logps: ``[B, K]`` summed response log-probs under the policy (values at padded slots are ignored).
        lengths: ``[B, K]`` response tokens.
        ranks: ``[B, K]`` ranks, lower is better; equal ranks are ties.
        response_mask: BoolTensor ``[B, K]``.
        ref_logps: ``[B, K]`` summed reference log-probs (``None`` for ``simpo``).
        beta, label_smoothing, gamma: see :func:`preference_pair_losses`.

    Returns:
        :class:`KwisePreferenceOutput`.
    """
    prompt, winner, loser = ranked_pairs(ranks, response_mask)
    ref_chosen = ref_rejected = None
    if ref_logps is not None:
        ref_chosen, ref_rejected = ref_logps[prompt, winner], ref_logps[prompt, loser]
    pair = preference_pair_losses(
        loss_type,
        logps[prompt, winner],
        logps[prompt, loser],
        lengths[prompt, winner],
        lengths[prompt, loser],
        ref_chosen,
        ref_rejected,
        beta=beta,
        label_smoothing=label_smoothing,
        gamma=gamma,
    )
    num_prompts = ranks.shape[0]
    num_pairs = torch.bincount(prompt, minlength=num_prompts)
    weights = 1.0 / num_pairs.clamp(min=1).to(pair.losses.dtype)
    # Σ_b mean_pairs(b) = Σ_pairs loss / pairs of its prompt; an empty batch gives a 0 attached to the graph.
    loss_sum = (pair.losses * weights[prompt]).sum() + 0.0 * torch.where(response_mask.bool(), logps, 0).sum()
    per_prompt = torch.zeros(num_prompts, dtype=pair.losses.dtype, device=logps.device)
    per_prompt = per_prompt.index_add(0, prompt, pair.losses.detach()) * weights
    return KwisePreferenceOutput(loss_sum, per_prompt, num_pairs, prompt, pair)


def top_ranked_nll(logps: Tensor, lengths: Tensor, ranks: Tensor, response_mask: Tensor) -> Tensor:
    """Per-token negative log-likelihood of each prompt's best-ranked response (RPO's NLL term, Pang et al. 2024;
    TRL's ``rpo_alpha``), averaged over responses tied at the top.

    DPO lowers the likelihood of both responses of a pair and can drift to text neither response contains; an NLL
    term on the preferred response anchors the policy to it (docs/conventions.md#dpo-losses).

    Args:
        logps: ``[B, K]`` summed response log-probs under the policy.
        lengths: ``[B, K]`` response tokens.
        ranks: ``[B, K]`` ranks, lower is better.
        response_mask: BoolTensor ``[B, K]``, False on padded slots.

    Returns:
        ``[B]`` ``−log π(y_best|x) / |y_best|`` (0 for a prompt without responses).
    """
    real = response_mask.bool()
    top = ranks.masked_fill(~real, torch.iinfo(torch.int64).max).min(-1, keepdim=True).values
    best = real & (ranks == top)
    per_token = torch.where(best, -logps / lengths.clamp(min=1).to(logps.dtype), 0)
    return per_token.sum(-1) / best.sum(-1).clamp(min=1).to(logps.dtype)
