"""`python -m shakegpt [command] ARGS…` hands ARGS to the named command, training by default."""

import sys
from types import SimpleNamespace

import pytest

import shakegpt.__main__ as entry


@pytest.mark.parametrize(
    ("argv", "module", "args"),
    [
        ([], "shakegpt.commands.train", []),
        (["model=v3", "trainer.devices=2"], "shakegpt.commands.train", ["model=v3", "trainer.devices=2"]),
        (["train", "model=v1"], "shakegpt.commands.train", ["model=v1"]),
        (["sample", "ckpt_path=run"], "shakegpt.commands.sample", ["ckpt_path=run"]),
        (["evaluate", "ckpt_path=run"], "shakegpt.commands.evaluate", ["ckpt_path=run"]),
        (["eval", "ckpt_path=run"], "shakegpt.commands.evaluate", ["ckpt_path=run"]),
        (["export", "run", "bundle"], "shakegpt.commands.export", ["run", "bundle"]),
        (["results", "table"], "shakegpt.commands.results", ["table"]),
        (["bench", "--presets", "v1"], "shakegpt.commands.bench", ["--presets", "v1"]),
        (["gpu-check", "--dry-run"], "shakegpt.commands.gpu_check", ["--dry-run"]),
    ],
)
def test_each_command_gets_its_own_arguments(monkeypatch, argv, module, args):
    called = []
    fake = SimpleNamespace(main=lambda: called.append(list(sys.argv[1:])))
    monkeypatch.setattr(entry.importlib, "import_module", lambda name: called.append(name) or fake)
    monkeypatch.setattr(sys, "argv", ["python -m shakegpt"])
    entry.main(argv)
    assert called == [module, args]
