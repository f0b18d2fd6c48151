"""The buffer of DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476 §3.2;
docs/conventions.md#dynamic-sampling): the groups with signal drawn since the last update, checkpointed so that a
resumed run draws and trains exactly as an uninterrupted one."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_rlhf.hf.scoring import ScoringRows
from lit_rlhf.rlhf import Rollout

__all__ = ["SignalBuffer"]


class SignalBuffer:
    """Rows of groups whose ``K`` scores are not all equal (a group's rows adjacent), with their prompt fields,
    gathered over draws."""

    def __init__(self) -> None:
        self.parts: list[tuple[Rollout, ScoringRows]] = []
        self.draws = 0
        self.zero_signal_groups = torch.tensor(0.0)

    def add(self, rollout: Rollout, rows: ScoringRows, zero_signal_groups: Tensor) -> None:
        """One draw: keep the rows the algorithm kept (dropped groups lost their whole mask); count its
        zero-signal groups (summed over processes)."""
        kept = rollout.mask.any(1).nonzero().squeeze(1)
        self.parts.append((rollout.select(kept), rows.select(kept.tolist())))
        self.draws += 1
        self.zero_signal_groups = self.zero_signal_groups + zero_signal_groups

    def groups(self, group_size: int) -> int:
        """Groups of ``group_size`` rows held on this process."""
        return sum(len(r.responses) for r, _ in self.parts) // group_size

    def take(self, size: int, pad_token_id: int) -> tuple[Rollout, ScoringRows]:
        """The first ``size`` rows (whole groups) as one trimmed rollout and their prompt fields; the buffer
        empties (the extra groups are dropped, as in the paper)."""
        rollouts, rows = zip(*self.parts, strict=True)
        self.clear()
        merged = Rollout.concat(rollouts, pad_token_id).select(range(size)).trim()
        return merged, ScoringRows.concat(rows).select(slice(0, size))

    def clear(self) -> None:
        self.parts, self.draws, self.zero_signal_groups = [], 0, torch.tensor(0.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer": [(r._asdict(), vars(rows)) for r, rows in self.parts],
            "draws": self.draws,
            "zero_signal_groups": float(self.zero_signal_groups),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.parts = [
            (Rollout(**{name: t.to(device) for name, t in fields.items()}), ScoringRows(**rows))
            for fields, rows in state["buffer"]
        ]
        self.draws = int(state["draws"])
        self.zero_signal_groups = torch.tensor(state["zero_signal_groups"])
