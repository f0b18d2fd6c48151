"""Hugging Face glue: the one loading path (transformers + peft + bitsandbytes), export, tokenization, rollout
engines and sampling, per-token forwards and scalar scoring. Imports only :mod:`lit_rlhf.rlhf`,
:mod:`lit_rlhf.errors` and :mod:`lit_rlhf.outputs`."""

from lit_rlhf.hf.engines import Generation, HFEngine, RolloutEngine
from lit_rlhf.hf.export import save_pretrained_atomic
from lit_rlhf.hf.generation import SamplingConfig, sample_many, sample_responses
from lit_rlhf.hf.loading import PAD_TOKEN, is_peft, is_quantized, load_model, load_tokenizer, set_dropout, unwrap_peft
from lit_rlhf.hf.reward import RewardScorer
from lit_rlhf.hf.scorers import FunctionScorer, Scorer, ScoringRows, load_scorer
from lit_rlhf.hf.specs import LoraSpec, ModelSpec, QuantizationSpec

__all__ = [
    "PAD_TOKEN",
    "FunctionScorer",
    "Generation",
    "HFEngine",
    "LoraSpec",
    "ModelSpec",
    "QuantizationSpec",
    "RewardScorer",
    "RolloutEngine",
    "SamplingConfig",
    "Scorer",
    "ScoringRows",
    "is_peft",
    "is_quantized",
    "load_model",
    "load_scorer",
    "load_tokenizer",
    "sample_many",
    "sample_responses",
    "save_pretrained_atomic",
    "set_dropout",
    "unwrap_peft",
]
