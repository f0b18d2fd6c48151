"""Per-token forward passes of the PPO roles over ``prompt + response`` sequences.

Shapes: ``B`` rows, ``L = P + T`` sequence length (left-padded prompt, then the response), ``T`` response length,
``V`` vocabulary size, ``H`` hidden size. The logits that score response token ``t`` sit at sequence index
``P - 1 + t``; values use the same slice, so ``V[t] = V(s_t)`` (docs/conventions.md#index-alignment). Every
forward pass gets its position ids from the attention mask (docs/conventions.md#padding-and-positions).
"""

from __future__ import annotations

from torch import Tensor, nn

from lit_rlhf.hf.scoring import reward_normalization, token_scores
from lit_rlhf.rlhf.logprobs import sequence_logprobs
from lit_rlhf.rlhf.padding import position_ids_from_mask


def response_logits(
    model: nn.Module,
    query_responses: Tensor,
    attention_mask: Tensor,
    response_length: int,
    hidden: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logits ``[B, T, V]`` scoring each response token (and the last hidden states ``[B, T, H]``).

    Only the last ``T + 1`` positions are projected to the vocabulary (``logits_to_keep``), so no ``[B, L, V]``
    tensor is built for the prompt.
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

    The critic is initialised from the reward-model export, whose normalisation (InstructGPT's bias that makes
    demonstrations score 0) lives in its config. Applying it here makes ``V`` start on the scale of the
    normalised scores it has to predict (docs/conventions.md#critic) without editing the head's weights.
    """
    bias, scale = reward_normalization(critic)
    raw = token_scores(critic, query_responses, attention_mask)
    return (raw[:, -response_length - 1 : -1] - bias) / scale


def completion_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Summed log-probs ``log π(y|x)`` ``[N]`` of each row's labelled tokens, and their count ``[N]``.

    ``input_ids``/``attention_mask``/``labels`` are ``[N, L]`` (any padding side; ``labels`` is ``ignore_index``
    on the prompt and the padding). Columns that are padding in every row are dropped, and only the positions
    from the earliest labelled token on are projected to the vocabulary (``logits_to_keep``), so the prompt
    builds no ``[N, P, V]`` logits. Position ids come from the mask (docs/conventions.md#position-ids).
    """
    keep = attention_mask.bool().any(0)
    input_ids, attention_mask, labels = input_ids[:, keep], attention_mask[:, keep], labels[:, keep]
    labelled = (labels != ignore_index).any(0)
    length = input_ids.shape[1]
    # first labelled column; its logits sit one position earlier
    first = int(labelled.int().argmax()) if bool(labelled.any()) else length - 1
    logits_to_keep = length - max(first - 1, 0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=logits_to_keep,
        use_cache=False,
    )
    return sequence_logprobs(out.logits, labels[:, -logits_to_keep:], ignore_index)
