"""The corpus in plain PyTorch: where it comes from, how it is split, and how windows are drawn
from it. (`shakegpt.training.data` wraps this as a LightningDataModule.) Any UTF-8 text file is a
corpus; tinyshakespeare is the default.

Corpus resolution order: `data.path` -> `$SHAKEGPT_DATA` (a local copy of tinyshakespeare, so only
for that corpus) -> the local cache -> a download from `data.url`. A downloaded or cached copy is
used only if its sha256 matches; the cache keeps each source apart (a folder per URL and checksum);
downloads go to a temporary file that is renamed into place after verification, so a partial file
is never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset

from shakegpt.errors import DataError, checked_once
from shakegpt.tokenizer import CharTokenizer

log = logging.getLogger(__name__)

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# that file's 65 characters + <unk>: what a preset's model.vocab_size (null) becomes on it
TINYSHAKESPEARE_VOCAB_SIZE = 66
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


def cache_path(cache_dir: str | Path, url: str, sha256: str) -> Path:
    """Where the cache keeps the file at `url` with checksum `sha256`: a folder per source, named by
    the URL's last folder (readable) and a hash of the URL and checksum (distinct)."""
    parts = [p for p in urllib.parse.urlparse(url).path.split("/") if p]
    name = parts[-1] if parts else "corpus.txt"
    folder = parts[-2] if len(parts) > 1 else "corpus"
    key = hashlib.sha256(f"{url}\n{sha256}".encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"{folder}-{key}" / name


# where shakegpt cached tinyshakespeare before the cache had a folder per source; a copy there is
# still used when its checksum is the one asked for
OLD_CACHE = Path("tinyshakespeare") / "input.txt"


@checked_once
def check_source(path: object, url: object, sha256: object) -> None:
    """A corpus needs a file (`data.path`) or a URL with its checksum (`data.url`, `data.sha256`)."""
    if path:
        return
    if not url:
        raise DataError("no corpus: set data.path=/path/to/your.txt (a UTF-8 text file), or data.url and data.sha256")
    if not isinstance(sha256, str) or len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower()):
        raise DataError(
            f"data.url={url} needs data.sha256, the file's sha256 as 64 hex digits (sha256sum prints it); "
            f"got {sha256!r}"
        )


def download(url: str, dest: Path, sha256: str, timeout: float = 30.0) -> Path:
    """Fetch `url` to `dest` atomically; raise DataError if it cannot be fetched or its sha256 differs."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    except OSError as e:
        raise DataError(
            f"cannot write the corpus cache {dest.parent} ({e.strerror or e}); set paths.cache_dir to a writable "
            f"folder, or point data.path at a copy of {dest.name}"
        ) from None
    try:
        log.info("downloading %s -> %s", url, dest)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, os.fdopen(fd, "wb") as f:
                while chunk := r.read(1 << 16):
                    f.write(chunk)
        except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
            raise DataError(
                f"could not download the corpus from {url} ({getattr(e, 'reason', e)}). "
                f"Offline? Put a copy at {dest}, or pass data.path=/path/to/{dest.name}"
                + (f", or set {ENV_VAR}=/path/to/{dest.name}" if url == TINYSHAKESPEARE_URL else "")
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
    check_source(path, url, sha256)
    local = [(path, "data.path")]
    if url == TINYSHAKESPEARE_URL:
        local.append((os.environ.get(ENV_VAR), f"${ENV_VAR}"))
    for given, origin in local:
        if given:
            p = Path(given).expanduser()
            if not p.is_file():
                raise DataError(f"{origin}={given} does not exist or is not a file")
            return p
    root = Path(cache_dir or default_cache_dir()).expanduser()
    old = root / OLD_CACHE
    if old.is_file() and sha256_of(old) == sha256:
        return old
    cached = cache_path(root, url, sha256)
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
    # a byte-order mark (Windows editors write one) is a marker, not a character of the text
    if text.startswith("\ufeff"):
        log.info("corpus %s starts with a UTF-8 byte-order mark: left out of the text", path)
        text = text[1:]
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
