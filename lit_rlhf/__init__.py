"""lit_rlhf: the InstructGPT recipe (SFT → reward model → PPO) as PyTorch Lightning modules.

The layers, from the bottom (each imports only from the layers below it; see the README's "Architecture"):
:mod:`lit_rlhf.rlhf` (pure tensor math), :mod:`lit_rlhf.hf` (loading, tokenization, sampling, scoring),
:mod:`lit_rlhf.datamodules`, :mod:`lit_rlhf.models` (the LightningModules), :mod:`lit_rlhf.callbacks`, then the
applications (CLI, evaluation, labelling, iterated RLHF, quickstart).
"""

from lit_rlhf.callbacks import (
    HFExport,
    JsonlPredictionWriter,
    KLMonitor,
    LoRAQuantization,
    PreemptionCheckpoint,
    RewardNormalization,
    RolloutScorer,
)
from lit_rlhf.datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
from lit_rlhf.errors import DataError
from lit_rlhf.hf import LoraSpec, ModelSpec, QuantizationSpec, SamplingConfig, load_model, load_tokenizer
from lit_rlhf.models import (
    CriticFreeConfig,
    CriticFreeModule,
    DPOModule,
    KLConfig,
    PPOConfig,
    PPOModule,
    PTXConfig,
    RewardConfig,
    RewardModule,
    RLHFModule,
    SFTModule,
    WarmupCosineLR,
)

__version__ = "0.1.0"

__all__ = [
    "CriticFreeConfig",
    "CriticFreeModule",
    "DPOModule",
    "DataError",
    "HFExport",
    "JsonlPredictionWriter",
    "KLConfig",
    "KLMonitor",
    "LoRAQuantization",
    "LoraSpec",
    "ModelSpec",
    "PPOConfig",
    "PPOModule",
    "PTXConfig",
    "PreemptionCheckpoint",
    "PreferenceDataModule",
    "PromptDataModule",
    "QuantizationSpec",
    "RLHFModule",
    "RewardConfig",
    "RewardModule",
    "RewardNormalization",
    "RolloutScorer",
    "SFTDataModule",
    "SFTModule",
    "SamplingConfig",
    "WarmupCosineLR",
    "load_model",
    "load_tokenizer",
]
