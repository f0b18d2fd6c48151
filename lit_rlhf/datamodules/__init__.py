"""DataModules of every stage, on shared plumbing (:mod:`lit_rlhf.datamodules.base`)."""

from lit_rlhf.datamodules.base import DataError, RLHFDataModule, read_rows
from lit_rlhf.datamodules.preference import PreferenceDataModule
from lit_rlhf.datamodules.prompts import PromptDataModule
from lit_rlhf.datamodules.sft import SFTDataModule

__all__ = ["DataError", "PreferenceDataModule", "PromptDataModule", "RLHFDataModule", "SFTDataModule", "read_rows"]
