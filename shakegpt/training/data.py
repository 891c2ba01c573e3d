"""The LightningDataModule over the corpus (shakegpt.corpus): endless seeded training windows,
resumable from any step, and every validation window once, shared across DDP ranks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from shakegpt.corpus import (
    TINYSHAKESPEARE_SHA256,
    TINYSHAKESPEARE_URL,
    RandomWindows,
    ValWindows,
    check_source,
    cut_windows,
    read_corpus,
    resolve_corpus,
    split_ids,
)
from shakegpt.errors import ConfigError, checked_once, is_number, non_negative_int, positive_int
from shakegpt.logs import FILE_ONLY
from shakegpt.tokenizer import CharTokenizer

log = logging.getLogger(__name__)


@checked_once
def check_data(batch_size: Any, seq_len: Any, val_fraction: Any, num_workers: Any = 0) -> None:
    positive_int("data.batch_size", batch_size)
    positive_int("data.seq_len", seq_len)
    if not is_number(val_fraction) or not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction!r} is invalid; it must be in (0, 1)")
    non_negative_int("data.num_workers", num_workers)


class CharDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str | None = None,
        batch_size: int = 64,
        seq_len: int = 256,
        val_fraction: float = 0.1,
        seed: int = 0,
        cache_dir: str | None = None,
        url: str = TINYSHAKESPEARE_URL,
        sha256: str = TINYSHAKESPEARE_SHA256,
        num_workers: int = 0,
        vocab: str | None = None,
    ):
        """`vocab`: encode with this vocabulary (a checkpoint's) instead of the corpus's own."""
        super().__init__()
        check_data(batch_size, seq_len, val_fraction, num_workers)
        check_source(path, url, sha256)
        self.path, self.cache_dir, self.url, self.sha256 = path, cache_dir, url, sha256
        self.batch_size, self.seq_len, self.val_fraction = batch_size, seq_len, val_fraction
        self.seed, self.num_workers, self.vocab = seed, num_workers, vocab
        self.corpus_path: Path | None = None
        self.tokenizer: CharTokenizer | None = None
        self.train_ids = self.val_ids = None
        # set by train() on a GPU (shakegpt.hardware.step_choices): the training loader yields window
        # start offsets, and the windows are cut on the device from its copy of the training split
        self.cut_on_device = False
        self._device_ids: torch.Tensor | None = None

    def prepare_data(self) -> None:
        self.corpus_path = resolve_corpus(self.path, self.cache_dir, self.url, self.sha256)

    def setup(self, stage: str | None = None) -> None:
        if self.train_ids is not None:
            return
        if self.corpus_path is None:
            self.prepare_data()
        text = read_corpus(self.corpus_path)
        self.tokenizer = CharTokenizer(self.vocab) if self.vocab is not None else CharTokenizer.from_text(text)
        self.train_ids, self.val_ids = split_ids(
            text, self.tokenizer, self.val_fraction, self.seq_len, self.corpus_path
        )
        log.info(  # the terminal's header says it shorter
            "corpus %s: %d characters, vocabulary %d (+<unk>), train %d, val %d",
            self.corpus_path,
            len(text),
            len(self.tokenizer.chars),
            len(self.train_ids),
            len(self.val_ids),
            extra=FILE_ONLY,
        )

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, _ = self._rank_world()
        start = 0
        if self.trainer is not None:  # after a resume, continue the batch stream where it stopped
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
        ds = RandomWindows(
            self.train_ids, self.batch_size, self.seq_len, self.seed, rank, start, starts_only=self.cut_on_device
        )
        # pinned host memory: the offsets' copy to the GPU does not wait for the steps queued before
        pin = self.cut_on_device and torch.cuda.is_available()
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=pin)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if self.cut_on_device and isinstance(batch, torch.Tensor) and batch.dim() == 1:  # training offsets
            if self._device_ids is None or self._device_ids.device != device:
                self._device_ids = self.train_ids.to(device)
            return cut_windows(self._device_ids, batch.to(device, non_blocking=True), self.seq_len)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        ds = ValWindows(self.val_ids, self.seq_len, rank, world)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def settings(self) -> dict[str, Any]:
        """What the training stream depends on, by the config keys that set it."""
        return {
            "data.batch_size": self.batch_size,
            "data.seq_len": self.seq_len,
            "data.val_fraction": self.val_fraction,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint, so that a resumed run can say which of these it changed."""
        return {"settings": self.settings()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the stream's position follows the step (`train_dataloader`)."""

    def changed_since(self, state: dict[str, Any] | None) -> list[str]:
        """`key old -> new` for each setting that differs from those a checkpoint saved (none known
        for a checkpoint written before they were saved)."""
        saved = (state or {}).get("settings", {})
        now = self.settings()
        return [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
