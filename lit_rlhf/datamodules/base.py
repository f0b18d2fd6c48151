"""Data plumbing shared by every stage's DataModule: reading rows with precise errors, splits, padding.

Rows come from a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file, or from a Hugging Face hub dataset
name (``datasets.load_dataset``). Every row remembers where it came from (``file:line``), so a bad row is
reported with its place, before any training starts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from lit_rlhf.datamodules.loader import ResumableLoader
from lit_rlhf.errors import DataError

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Row:
    """One input record and where it came from (``where`` reads ``path:line`` or ``name[split][index]``)."""

    data: dict[str, Any]
    where: str


def read_rows(source: str, split: str = "train") -> list[Row]:
    """Read every record of ``source``.

    Args:
        source: a local file (by suffix), a ``datasets.save_to_disk`` folder, or a hub dataset name (optionally
            ``name:config``).
        split: split to read from a hub dataset or a saved DatasetDict; ignored for local files.

    Raises:
        DataError: the file does not exist, is empty, is not UTF-8, or holds a malformed line.
    """
    path = Path(source).expanduser()
    if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        rows = _read_saved(path, split)
    elif path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise DataError(f"{source}: no such file")
        rows = _read_json(path) if path.suffix in (".jsonl", ".json") else _read_with_datasets(path)
    else:
        rows = _read_hub(source, split)
    if not rows:
        raise DataError(f"{source}: no records (empty dataset)")
    return rows


def _read_json(path: Path) -> list[Row]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {err.start})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
        return [_as_row(record, f"{path}[{i}]") for i, record in enumerate(records)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}:{err.colno}: invalid JSON: {err.msg}") from None
        rows.append(_as_row(record, f"{path}:{lineno}"))
    return rows


def _as_row(record: Any, where: str) -> Row:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return Row(record, where)


def _read_with_datasets(path: Path) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parser errors in many types
        raise DataError(f"{path}: could not be read: {err}") from err
    return [Row(dict(record), f"{path}:{i + 2 if path.suffix == '.csv' else i}") for i, record in enumerate(ds)]


def _read_saved(path: Path, split: str) -> list[Row]:
    """A ``datasets.save_to_disk`` folder: a Dataset, or a DatasetDict of which ``split`` is read."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: could not be read with datasets.load_from_disk: {err}") from err
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (splits: {sorted(ds)})")
        ds = ds[split]
        return [Row(dict(record), f"{path}[{split}][{i}]") for i, record in enumerate(ds)]
    return [Row(dict(record), f"{path}[{i}]") for i, record in enumerate(ds)]


def _read_hub(name: str, split: str) -> list[Row]:
    import datasets

    dataset_name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset_name, config or None, split=split)
    except Exception as err:
        raise DataError(f"{name}: not a local file and could not be loaded as a hub dataset: {err}") from err
    return [Row(dict(record), f"{name}[{split}][{i}]") for i, record in enumerate(ds)]


def require_str(row: Row, column: str, allow_empty: bool = False) -> str:
    """The string in ``column`` of ``row``, or a :class:`DataError` naming the place and the column."""
    if column not in row.data:
        raise DataError(f"{row.where}: missing column {column!r} (columns present: {sorted(row.data)})")
    value = row.data[column]
    if not isinstance(value, str):
        raise DataError(f"{row.where}: column {column!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{row.where}: column {column!r} is empty")
    return value


def split_rows(rows: list[Row], val_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Seeded split of ``rows`` into train and validation parts."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = round(len(rows) * val_fraction)
    return [rows[i] for i in sorted(order[n_val:])], [rows[i] for i in sorted(order[:n_val])]


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as JSON Lines (UTF-8, one object per line, parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path


class RLHFDataModule(L.LightningDataModule):
    """Base DataModule: sources, splits, tokenizer resolution and loaders.

    Args:
        train_data: local file or hub dataset name for training.
        val_data: local file or hub dataset name for validation; when ``None``, ``val_fraction`` of
            ``train_data`` is held out instead.
        val_fraction: fraction of ``train_data`` held out when ``val_data`` is not given.
        train_split: split of a hub dataset used for training.
        val_split: split of a hub dataset used for validation.
        tokenizer: tokenizer hub id or folder. ``None`` uses the LightningModule's tokenizer, so model and
            data can never disagree about the pad token.
        batch_size: examples per optimizer step (per process). Micro-batching is the model's business.
        num_workers: DataLoader workers.
        seed: seed of the validation split and of the shuffling.
    """

    #: drop a final incomplete training batch (subclasses may expose it as an argument)
    drop_last: bool = False
    #: file or hub dataset read by ``predict`` (subclasses that support it take it as an argument)
    predict_data: str | None = None
    predict_dataset: list[dict[str, Any]] | None = None
    #: what a tokenizer named by ``tokenizer`` is loaded for (reward-model data may use an encoder's)
    tokenizer_role: str = "policy"

    def __init__(
        self,
        train_data: str,
        val_data: str | None = None,
        val_fraction: float = 0.0,
        train_split: str = "train",
        val_split: str = "validation",
        tokenizer: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_data = train_data
        self.val_data = val_data
        self.val_fraction = val_fraction
        self.train_split = train_split
        self.val_split = val_split
        self.tokenizer_name = tokenizer
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer = None
        # tokenized examples; a list is a map-style dataset
        self.train_dataset: list[dict[str, Any]] | None = None
        self.val_dataset: list[dict[str, Any]] | None = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_name is not None:
                from lit_rlhf.hf.loading import load_tokenizer

                self._tokenizer = load_tokenizer(self.tokenizer_name, role=self.tokenizer_role)
            elif self.trainer is not None and getattr(self.trainer.lightning_module, "tokenizer", None):
                self._tokenizer = self.trainer.lightning_module.tokenizer
            else:
                raise ValueError(
                    f"{type(self).__name__} needs a tokenizer: pass `tokenizer=` or attach it to a Trainer "
                    "together with a lit_rlhf module."
                )
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    def read_splits(self) -> tuple[list[Row], list[Row]]:
        train = read_rows(self.train_data, self.train_split)
        if self.val_data is not None:
            return train, read_rows(self.val_data, self.val_split)
        return split_rows(train, self.val_fraction, self.seed)

    def build_examples(self, rows: list[Row], name: str) -> list[dict[str, Any]]:
        """Tokenize ``rows`` into examples (subclasses)."""
        raise NotImplementedError

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def build_predict_example(self, row: Row) -> dict[str, Any]:
        """Tokenize one ``predict_data`` row; the example keeps the row (``"row"``) for the output."""
        raise NotImplementedError(f"{type(self).__name__} does not support predict")

    def collate_predict(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} does not support predict")

    def predict_dataloader(self) -> DataLoader:
        assert self.predict_dataset is not None, "call setup('predict') first"
        return DataLoader(
            self.predict_dataset,
            batch_size=self.batch_size,
            collate_fn=self.collate_predict,
            num_workers=self.num_workers,
        )

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            if self.predict_data is None:
                raise ValueError(f"{type(self).__name__}: `predict_data` must name the rows to predict on")
            if self.predict_dataset is None:
                rows = read_rows(self.predict_data)
                self.predict_dataset = [self.build_predict_example(row) for row in rows]
            return
        if self.train_dataset is not None:
            return
        train_rows, val_rows = self.read_splits()
        self.train_dataset = self.build_examples(train_rows, self.train_data)
        if val_rows:
            self.val_dataset = self.build_examples(val_rows, self.val_data or self.train_data)
        if len(self.train_dataset) == 0:
            raise DataError(f"{self.train_data}: no usable training example left")

    def _loader(self, dataset: list[dict[str, Any]], shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, collate_fn=self.collate, num_workers=self.num_workers
        )

    def _progress(self) -> int:
        """Training batches processed so far in the run (0 outside of a Trainer)."""
        trainer = self.trainer
        return 0 if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def train_dataloader(self) -> ResumableLoader:
        """Seeded, shuffled batches, sharded over processes, resumable mid-epoch from a checkpoint."""
        assert self.train_dataset is not None, "call setup() first"
        trainer = self.trainer
        return ResumableLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            collate_fn=self.collate,
            progress=self._progress,
            shuffle=True,
            seed=self.seed,
            drop_last=self.drop_last,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_dataset, shuffle=False) if self.val_dataset else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()


def warn_dropped(dropped: int, total: int, source: str, reason: str) -> None:
    if dropped:
        rank_zero_warn(f"{source}: dropped {dropped} of {total} examples: {reason}")
