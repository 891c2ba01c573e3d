import hashlib
from pathlib import Path

import pytest
import torch

from shakegpt.corpus import (
    TINYSHAKESPEARE_SHA256,
    RandomWindows,
    ValWindows,
    cache_path,
    read_corpus,
    resolve_corpus,
)
from shakegpt.errors import DataError
from shakegpt.training.data import CharDataModule

OFFLINE_URL = "http://127.0.0.1:9/input.txt"  # the discard port on loopback: refused at once


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_explicit_path_wins_over_env(tiny_corpus, tmp_path, monkeypatch):
    other = tmp_path / "other.txt"
    other.write_text("abc")
    monkeypatch.setenv("SHAKEGPT_DATA", str(other))
    assert resolve_corpus(str(tiny_corpus), cache_dir=tmp_path / "cache", url=OFFLINE_URL) == tiny_corpus
    assert resolve_corpus(None, cache_dir=tmp_path / "cache") == other  # (tinyshakespeare's local copy)


def test_missing_explicit_path_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("SHAKEGPT_DATA", raising=False)
    with pytest.raises(DataError, match=r"data.path=/no/such/file.txt does not exist"):
        resolve_corpus("/no/such/file.txt", cache_dir=tmp_path)


def test_download_is_verified_and_cached(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("SHAKEGPT_DATA", raising=False)
    url, digest = tiny_corpus.as_uri(), sha256(tiny_corpus)
    got = resolve_corpus(None, cache_dir=tmp_path, url=url, sha256=digest)
    assert got == cache_path(tmp_path, url, digest) and got.parent.name.startswith("fixtures-")
    assert got.read_bytes() == tiny_corpus.read_bytes()
    # the verified cached copy is used without the network
    # the verified cached copy is used without the network (the same source: URL and checksum)
    assert resolve_corpus(None, cache_dir=tmp_path, url=url, sha256=digest) == got


def test_checksum_mismatch_keeps_no_file(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("SHAKEGPT_DATA", raising=False)
    with pytest.raises(DataError, match="checksum mismatch.*expected " + TINYSHAKESPEARE_SHA256):
        resolve_corpus(None, cache_dir=tmp_path, url=tiny_corpus.as_uri())
    assert not any(p.is_file() for p in tmp_path.rglob("*")), "a mismatching file was left behind"


def test_corrupt_cache_is_replaced(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("SHAKEGPT_DATA", raising=False)
    cached = cache_path(tmp_path, tiny_corpus.as_uri(), sha256(tiny_corpus))
    cached.parent.mkdir(parents=True)
    cached.write_text(tiny_corpus.read_text()[:100])  # a truncated earlier download
    got = resolve_corpus(None, cache_dir=tmp_path, url=tiny_corpus.as_uri(), sha256=sha256(tiny_corpus))
    assert got == cached
    assert got.read_bytes() == tiny_corpus.read_bytes()


def test_offline_without_a_copy_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SHAKEGPT_DATA", raising=False)
    with pytest.raises(DataError) as e:
        resolve_corpus(None, cache_dir=tmp_path, url=OFFLINE_URL)
    msg = str(e.value)
    assert "could not download" in msg and str(cache_path(tmp_path, OFFLINE_URL, TINYSHAKESPEARE_SHA256)) in msg
    # $SHAKEGPT_DATA stands for tinyshakespeare only: for another URL, data.path is the way
    assert "data.path" in msg and "SHAKEGPT_DATA" not in msg


@pytest.mark.parametrize(("content", "message"), [(b"", "is empty"), (b"\xff\xfe\x00bad", "not UTF-8")])
def test_unreadable_corpus(tmp_path, content, message):
    p = tmp_path / "corpus.txt"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_corpus(p)


def test_train_windows_are_reproducible_and_differ_by_rank():
    ids = torch.arange(1000, dtype=torch.int16)
    a = RandomWindows(ids, 4, 16, seed=3, rank=0)
    x, y = a.batch(5)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    assert torch.equal(RandomWindows(ids, 4, 16, seed=3, rank=0).batch(5)[0], x)
    assert not torch.equal(RandomWindows(ids, 4, 16, seed=3, rank=1).batch(5)[0], x)
    assert not torch.equal(RandomWindows(ids, 4, 16, seed=4, rank=0).batch(5)[0], x)
    # a stream started at batch n continues exactly where a full stream would be
    full = iter(RandomWindows(ids, 4, 16, seed=3))
    for _ in range(5):
        next(full)
    assert torch.equal(next(iter(RandomWindows(ids, 4, 16, seed=3, start=5)))[0], next(full)[0])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_val_windows_cover_the_split_once_across_ranks(world):
    ids = torch.arange(101)
    seen = []
    for rank in range(world):
        ds = ValWindows(ids, 10, rank, world)
        seen += [ds[i][0] for i in range(len(ds))]
    starts = sorted(int(x[0]) for x in seen)
    assert starts == list(range(0, 100, 10))  # every non-overlapping window, none twice, no padding


def test_datamodule_split_and_vocab(real_corpus):
    dm = CharDataModule(path=str(real_corpus), batch_size=2, seq_len=8)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_ids) == 1_003_854 and len(dm.val_ids) == 111_540
    assert dm.tokenizer.vocab_size == 66 and dm.train_ids.dtype == torch.uint8
    # evaluate's `last pos` averages one position per window: the docs say how few that is at v3's 256
    windows = len(ValWindows(dm.val_ids, 256))
    docs = Path(__file__).resolve().parents[2] / "docs"
    assert f"({windows} for tinyshakespeare at seq_len 256)" in (docs / "sampling.md").read_text()
    assert f"the validation split's {windows} windows" in " ".join((docs / "results.md").read_text().split())


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(batch_size=0), "data.batch_size=0 is invalid"),
        (dict(seq_len=-1), "data.seq_len=-1 is invalid"),
        (dict(val_fraction=1.5), "data.val_fraction=1.5 is invalid"),
    ],
)
def test_bad_data_values_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        CharDataModule(**kw)


def test_corpus_shorter_than_a_window_is_named(tiny_corpus):
    dm = CharDataModule(path=str(tiny_corpus), seq_len=500)
    with pytest.raises(DataError, match="fewer than data.seq_len"):
        dm.setup("fit")


def test_an_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("SHAKEGPT_DATA", raising=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=f"cannot write the corpus cache {tmp_path}/file/corpus-.* set paths.cache_dir"):
        resolve_corpus(cache_dir=tmp_path / "file", url="http://127.0.0.1:9/x.txt")
