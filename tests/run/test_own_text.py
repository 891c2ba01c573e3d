"""Any UTF-8 text file is a corpus (`data=text data.path=…`): the vocabulary and model.vocab_size
follow its characters, and the run trains, samples, evaluates and exports as on tinyshakespeare."""

import hashlib
import io
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from shakegpt.commands.evaluate import evaluate_checkpoint
from shakegpt.commands.sample import sample
from shakegpt.corpus import TINYSHAKESPEARE_URL, cache_path, resolve_corpus
from shakegpt.errors import ConfigError, DataError
from shakegpt.run.records import read_scalars
from shakegpt.run.train import train
from shakegpt.training.checkpoint import export_bundle, load_bundle, model_from_checkpoint, resolve_checkpoint

from ..conftest import compose_cfg

OWN = Path(__file__).parents[1] / "fixtures" / "own_text.txt"  # German, Greek, Japanese, Danish, Turkish, Polish


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def own_corpus(tmp_path) -> Path:
    lines = OWN.read_text(encoding="utf-8").splitlines()
    rng = random.Random(0)
    text = "\n".join(line for _ in range(8) for line in rng.sample(lines, len(lines))) + "\n"
    path = tmp_path / "mein text.txt"  # a space in the name, as users' files have
    path.write_text(text, encoding="utf-8")
    return path


def test_a_non_english_text_trains_samples_evaluates_and_exports(own_corpus, tmp_path):
    text = own_corpus.read_text(encoding="utf-8")
    run = tmp_path / "run"
    cfg = compose_cfg(
        run,
        "data=text",
        f"data.path={own_corpus}",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.precision=32-true",  # fp32, so that evaluate gives the logged val loss to 1e-5
    )
    assert cfg.model.vocab_size is None  # derived from the corpus, not set by the preset
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    model, tokenizer, _ = model_from_checkpoint(run)
    assert tokenizer.chars == "".join(sorted(set(text))) and model.cfg.vocab_size == len(set(text)) + 1 > 66

    out = io.StringIO()
    prompt = "Ἡ θάλασσα "
    sampled = sample(OmegaConf.create({**_sample_defaults(), "ckpt_path": str(run), "prompt": prompt}), out)
    assert out.getvalue().startswith(prompt) and len(sampled[0]) == 40 and set(sampled[0]) <= set(text)

    best = resolve_checkpoint(run)
    row = evaluate_checkpoint(best, {"path": str(own_corpus), "batch_size": 4, "seq_len": None}, precision="32-true")
    logged = {s: v for s, v, _ in read_scalars(run)["val/loss"]}
    assert row["val_loss"] == pytest.approx(logged[row["step"]], abs=1e-5)

    again, tok = load_bundle(export_bundle(run, tmp_path / "bundle"))
    x = tokenizer.encode("川の向こうで、")[None]
    assert tok.chars == tokenizer.chars and torch.equal(model.eval()(x), again.eval()(x))


def _sample_defaults() -> dict:
    conf = Path(__file__).parents[2] / "conf"
    base = OmegaConf.to_container(OmegaConf.load(conf / "sample.yaml"))
    base.pop("defaults"), base.pop("hydra")
    return {**base, **OmegaConf.to_container(OmegaConf.load(conf / "sampling" / "default.yaml")), "num_chars": 40}


def test_a_text_preset_without_a_file_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"^no corpus: set data.path=/path/to/your.txt \(a UTF-8 text file\)"):
        train(compose_cfg(tmp_path, "data=text", "data.path=null"))
    with pytest.raises(DataError, match=r"data.url=https://x.org/a.txt needs data.sha256, .* got None"):
        train(compose_cfg(tmp_path, "data=text", "data.path=null", "data.url=https://x.org/a.txt"))


def test_a_vocabulary_set_smaller_than_the_corpus_is_refused(own_corpus, tmp_path):
    cfg = compose_cfg(tmp_path, "data=text", f"data.path={own_corpus}", "model.vocab_size=66")
    with pytest.raises(ConfigError, match=r"model.vocab_size=66 is smaller than the corpus vocabulary"):
        train(cfg)


def test_the_cache_keeps_each_source_apart(tiny_corpus, own_corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("SHAKEGPT_DATA", raising=False)
    cache = tmp_path / "cache"
    a = resolve_corpus(None, cache, url=tiny_corpus.as_uri(), sha256=sha256(tiny_corpus))
    b = resolve_corpus(None, cache, url=own_corpus.as_uri(), sha256=sha256(own_corpus))
    assert a != b and a.read_bytes() == tiny_corpus.read_bytes() and b.read_bytes() == own_corpus.read_bytes()
    assert a == cache_path(cache, tiny_corpus.as_uri(), sha256(tiny_corpus))
    # the same file name at another URL, or with another checksum, is another entry
    assert cache_path(cache, "https://a.org/x/input.txt", "0" * 64) != cache_path(
        cache, "https://b.org/x/input.txt", "0" * 64
    )
    assert cache_path(cache, "https://a.org/x/input.txt", "0" * 64) != cache_path(
        cache, "https://a.org/x/input.txt", "1" * 64
    )
    assert cache_path(cache, TINYSHAKESPEARE_URL, "0" * 64).parent.name.startswith("tinyshakespeare-")


def test_shakegpt_data_stands_for_tinyshakespeare_only(tiny_corpus, own_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("SHAKEGPT_DATA", str(tiny_corpus))
    assert resolve_corpus(None, tmp_path) == tiny_corpus  # the default corpus: the local copy
    got = resolve_corpus(None, tmp_path, url=own_corpus.as_uri(), sha256=sha256(own_corpus))
    assert got.read_bytes() == own_corpus.read_bytes()  # another corpus: its own file, not tinyshakespeare


def test_a_corpus_of_ones_own_is_one_yaml(own_corpus, tmp_path):
    """docs/configuration.md: a corpus is `conf/data/name.yaml` starting from `text` (here in a user's
    config directory, as `hydra.searchpath` adds it); the rest of data comes from the default's."""
    from hydra.utils import instantiate

    data_dir = tmp_path / "conf" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "mybook.yaml").write_text(f"defaults:\n  - text\n  - _self_\n\npath: {own_corpus}\n")
    cfg = compose_cfg(tmp_path / "run", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "data=mybook", shrink=False)
    default = compose_cfg(tmp_path / "run", shrink=False)
    assert cfg.data.path == str(own_corpus) and cfg.data.batch_size == default.data.batch_size
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.tokenizer.chars == "".join(sorted(set(own_corpus.read_text(encoding="utf-8"))))


def test_a_byte_order_mark_is_not_a_character_of_the_corpus(tmp_path):
    """Windows editors start UTF-8 files with a byte-order mark: it is left out, not made a character."""
    from shakegpt.corpus import read_corpus

    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffROMEO: Good morrow.\n".encode())
    assert read_corpus(path) == "ROMEO: Good morrow.\n"
