import pytest
import torch

from shakegpt.corpus import read_corpus
from shakegpt.tokenizer import CharTokenizer


def test_round_trip_and_sorted_ids():
    tok = CharTokenizer.from_text("hello, world\n")
    assert tok.chars == "\n ,dehlorw"
    text = "world, hello\nhello"
    ids = tok.encode(text)
    assert ids.dtype == torch.long
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.encode("d").item() == 3


def test_unknown_characters_map_to_unk():
    tok = CharTokenizer.from_text("abc")
    assert tok.vocab_size == 4 and tok.unk_id == 3
    ids = tok.encode("aZb?")
    assert ids.tolist() == [0, 3, 1, 3]
    assert tok.decode(ids) == "a\ufffdb\ufffd"
    assert tok.unknown_chars("aZb?c") == ["?", "Z"]


def test_save_load(tmp_path):
    tok = CharTokenizer.from_text("To be, or not to be: that is the question.\n")
    tok.save(tmp_path / "vocab.json")
    again = CharTokenizer.load(tmp_path / "vocab.json")
    assert again.chars == tok.chars and again.vocab_size == tok.vocab_size


@pytest.mark.parametrize("bad", ["", "aa"])
def test_invalid_vocabularies(bad):
    with pytest.raises(ValueError):
        CharTokenizer(bad)


def test_real_corpus_has_65_characters_plus_unk(real_corpus):
    text = read_corpus(real_corpus)
    assert len(text) == 1_115_394
    tok = CharTokenizer.from_text(text)
    assert len(tok.chars) == 65
    assert tok.vocab_size == 66  # the original runs' d_input
    assert tok.decode(tok.encode(text[:5000])) == text[:5000]
