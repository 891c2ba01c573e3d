"""The tinyshakespeare corpus in plain PyTorch: where it comes from, how it is split, and how
windows are drawn from it. (`shakegpt.training.data` wraps this as a LightningDataModule.)

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

import torch
from torch.utils.data import Dataset, IterableDataset

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

    def __init__(
        self,
        ids: torch.Tensor,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        start: int = 0,
        starts_only: bool = False,
    ):
        """`starts_only`: yield each batch's window start offsets (B,) instead of the windows, for a
        device to cut them from its own copy of `ids` (`cut_windows`): the same batches, built there."""
        self.ids, self.batch_size, self.seq_len = ids, batch_size, seq_len
        self.seed, self.rank, self.start, self.starts_only = seed, rank, start, starts_only

    def starts(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_000_007 + n) % 2**63)
        return torch.randint(len(self.ids) - self.seq_len, (self.batch_size,), generator=g)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return cut_windows(self.ids, self.starts(n), self.seq_len)

    def __iter__(self):
        n = self.start
        while True:
            yield self.starts(n) if self.starts_only else self.batch(n)
            n += 1


def cut_windows(ids: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, targets) windows of `seq_len` characters at `starts`, on the device `ids` is on."""
    w = ids[starts[:, None] + torch.arange(seq_len + 1, device=ids.device)].long()  # (B, T+1)
    return w[:, :-1], w[:, 1:]


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


def split_ids(text: str, tokenizer: CharTokenizer, val_fraction: float, seq_len: int, origin: Path | str):
    """(train ids, val ids) of `text`: the first 1 - val_fraction for training, the rest for
    validation, as nanoGPT splits it; each split must hold at least one window of seq_len + 1."""
    # one byte per character while the vocabulary fits, widened per batch
    ids = tokenizer.encode(text).to(smallest_id_dtype(tokenizer.vocab_size))
    n_train = int(len(ids) * (1 - val_fraction))
    train_ids, val_ids = ids[:n_train], ids[n_train:]
    for split, part in (("train", train_ids), ("val", val_ids)):
        if len(part) <= seq_len:
            raise DataError(
                f"the {split} split of {origin} has {len(part)} characters, fewer than "
                f"data.seq_len + 1 = {seq_len + 1}; use a longer corpus or a smaller data.seq_len"
            )
    return train_ids, val_ids
