"""The LightningDataModule over the corpus (shakegpt.corpus): endless seeded training windows,
resumable from any step, and every validation window once, shared across DDP ranks."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from shakegpt.checks import check_data
from shakegpt.console import FILE_ONLY
from shakegpt.corpus import (
    TINYSHAKESPEARE_SHA256,
    TINYSHAKESPEARE_URL,
    RandomWindows,
    ValWindows,
    read_corpus,
    resolve_corpus,
    split_ids,
)
from shakegpt.tokenizer import CharTokenizer

log = logging.getLogger(__name__)


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
        self.path, self.cache_dir, self.url, self.sha256 = path, cache_dir, url, sha256
        self.batch_size, self.seq_len, self.val_fraction = batch_size, seq_len, val_fraction
        self.seed, self.num_workers, self.vocab = seed, num_workers, vocab
        self.corpus_path: Path | None = None
        self.tokenizer: CharTokenizer | None = None
        self.train_ids = self.val_ids = None

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
        ds = RandomWindows(self.train_ids, self.batch_size, self.seq_len, self.seed, rank, start)
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        ds = ValWindows(self.val_ids, self.seq_len, rank, world)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
