"""lit_rlhf: the InstructGPT recipe (SFT → reward model → PPO) as PyTorch Lightning modules."""

from lit_rlhf.callbacks import HFExport, LoRAQuantization
from lit_rlhf.datamodules import DataError, SFTDataModule
from lit_rlhf.hf import LoraSpec, ModelSpec, QuantizationSpec, load_model, load_tokenizer
from lit_rlhf.models import RLHFModule, SFTModule, WarmupCosineLR

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "HFExport",
    "LoRAQuantization",
    "LoraSpec",
    "ModelSpec",
    "QuantizationSpec",
    "RLHFModule",
    "SFTDataModule",
    "SFTModule",
    "WarmupCosineLR",
    "load_model",
    "load_tokenizer",
]
