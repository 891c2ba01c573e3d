"""The tinyshakespeare corpus: where it comes from, how it is split, and how batches are drawn.

Corpus resolution order: `data.path` -> `$SHAKEGPT_DATA` -> local cache -> download from the
char-rnn URL. A downloaded or cached copy is used only if its sha256 matches; downloads go to a
temporary file that is renamed into place after verification, so a partial file is never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from shakegpt.checks import check_data
from shakegpt.errors import DataError
from shakegpt.tokenizer import CharTokenizer

log = logging.getLogger(__name__)

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
ENV_VAR = "SHAKEGPT_DATA"


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "shakegpt"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str, timeout: float = 30.0) -> Path:
    """Fetch `url` to `dest` atomically; raise DataError if it cannot be fetched or its sha256 differs."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    except OSError as e:
        raise DataError(
            f"cannot write the corpus cache {dest.parent} ({e.strerror or e}); set paths.cache_dir to a writable "
            f"folder, or point data.path (or {ENV_VAR}) at a copy of input.txt"
        ) from None
    try:
        log.info("downloading %s -> %s", url, dest)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, os.fdopen(fd, "wb") as f:
                while chunk := r.read(1 << 16):
                    f.write(chunk)
        except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
            raise DataError(
                f"could not download tinyshakespeare from {url} ({getattr(e, 'reason', e)}). "
                f"Offline? Put a copy at {dest}, or set {ENV_VAR}=/path/to/input.txt, or pass data.path=/path/to/input.txt"
            ) from None
        got = sha256_of(Path(tmp))
        if got != sha256:
            raise DataError(
                f"checksum mismatch for {url}: sha256 {got}, expected {sha256}; the file was discarded. "
                f"Check data.url or provide a verified copy with {ENV_VAR} or data.path"
            )
        os.replace(tmp, dest)
        return dest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_corpus(
    path: str | None = None,
    cache_dir: str | Path | None = None,
    url: str = TINYSHAKESPEARE_URL,
    sha256: str = TINYSHAKESPEARE_SHA256,
) -> Path:
    """Return the path of the corpus to use, downloading it into the cache if needed."""
    for given, origin in ((path, "data.path"), (os.environ.get(ENV_VAR), f"${ENV_VAR}")):
        if given:
            p = Path(given).expanduser()
            if not p.is_file():
                raise DataError(f"{origin}={given} does not exist or is not a file")
            return p
    cached = Path(cache_dir or default_cache_dir()).expanduser() / "tinyshakespeare" / "input.txt"
    if cached.is_file():
        if sha256_of(cached) == sha256:
            return cached
        log.warning("cached corpus %s fails its sha256 check; downloading it again", cached)
    return download(url, cached, sha256)


def read_corpus(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"corpus {path} is not UTF-8 text (byte {e.start}); point data.path at a text file") from None
    if not text:
        raise DataError(f"corpus {path} is empty; point data.path at a text file")
    return text


def smallest_id_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest integer type that holds every id (one byte per character for tinyshakespeare)."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if vocab_size - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


class RandomWindows(IterableDataset):
    """Endless batches of random windows. Batch number n on rank r is drawn from its own generator
    seeded by (seed, r, n), so the stream is reproducible, differs across ranks, and resumes
    exactly from any batch number."""

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, seed: int, rank: int = 0, start: int = 0):
        self.ids, self.batch_size, self.seq_len = ids, batch_size, seq_len
        self.seed, self.rank, self.start = seed, rank, start
        self.offsets = torch.arange(seq_len + 1)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_000_007 + n) % 2**63)
        starts = torch.randint(len(self.ids) - self.seq_len, (self.batch_size,), generator=g)
        w = self.ids[starts[:, None] + self.offsets].long()  # (B, T+1)
        return w[:, :-1], w[:, 1:]

    def __iter__(self):
        n = self.start
        while True:
            yield self.batch(n)
            n += 1


class ValWindows(Dataset):
    """All non-overlapping windows of the validation split, this rank's share of them (no padding,
    so the DDP-reduced mean over ranks is the exact full-pass loss)."""

    def __init__(self, ids: torch.Tensor, seq_len: int, rank: int = 0, world_size: int = 1):
        self.ids, self.seq_len = ids, seq_len
        self.index = list(range(rank, (len(ids) - 1) // seq_len, world_size))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.index[i] * self.seq_len
        w = self.ids[s : s + self.seq_len + 1].long()
        return w[:-1], w[1:]


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
        ids = self.tokenizer.encode(text)
        # one byte per character while the vocabulary fits, widened per batch
        ids = ids.to(smallest_id_dtype(self.tokenizer.vocab_size))
        n_train = int(len(ids) * (1 - self.val_fraction))
        self.train_ids, self.val_ids = ids[:n_train], ids[n_train:]
        for split, part in (("train", self.train_ids), ("val", self.val_ids)):
            if len(part) <= self.seq_len:
                raise DataError(
                    f"the {split} split of {self.corpus_path} has {len(part)} characters, fewer than "
                    f"data.seq_len + 1 = {self.seq_len + 1}; use a longer corpus or a smaller data.seq_len"
                )
        log.info(
            "corpus %s: %d characters, vocabulary %d (+<unk>), train %d, val %d",
            self.corpus_path,
            len(ids),
            len(self.tokenizer.chars),
            len(self.train_ids),
            len(self.val_ids),
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
