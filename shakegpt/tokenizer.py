"""Character vocabulary: the sorted distinct characters of a corpus plus one `<unk>` id.

The vocabulary is a plain string (`chars`), so it is saved in every checkpoint's hyperparameters
and sampling needs no dataset. Ids 0..len(chars)-1 are the characters in sorted order (the same
ids nanoGPT uses); the last id is `<unk>`, which any character outside the corpus maps to.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shakegpt.errors import ConfigError

UNK = "<unk>"


class CharTokenizer:
    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ConfigError("vocabulary characters must be distinct")
        if not chars:
            raise ConfigError("vocabulary is empty: the corpus has no characters")
        self.chars = chars
        self.unk_id = len(chars)
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1  # + <unk>

    def encode(self, text: str) -> torch.Tensor:
        """str -> int64 tensor of ids, unknown characters -> unk_id."""
        get, unk = self._ids.get, self.unk_id
        return torch.tensor([get(c, unk) for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        """ids (tensor or list) -> str; `<unk>` ids decode to the replacement character U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        chars, n = self.chars, len(self.chars)
        return "".join(chars[i] if 0 <= i < n else "\ufffd" for i in ids)

    def unknown_chars(self, text: str) -> list[str]:
        return sorted(set(text) - set(self._ids))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"chars": self.chars, "unk": UNK}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        return cls(json.loads(Path(path).read_text())["chars"])
