"""Every check a training config must pass before any work starts.

`check_train_config(cfg, output_dir)` runs once per run: before Hydra makes the run directory (from
the Hydra callback in `shakegpt.run.rundir`, which then marks the directory checked), or else at the
top of `train()`, so a notebook, a test or a sweep job gets the same checks. Each failure is one `ConfigError` (or `DataError`/`CheckpointError`)
whose message names the key, the value and what is accepted. Checks that need the corpus (the
vocabulary size, a resumed run's vocabulary) run in `train()` once the corpus is read, still before
the Trainer starts.

The module imports neither torch nor OmegaConf until a check needs them, so a command line can
refuse a bad value before paying for those imports.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

from shakegpt.errors import CheckpointError, ConfigError, DataError, is_int, is_number, non_negative_int, positive_int
from shakegpt.sampling import check_sampling

# torch.manual_seed and Lightning's seed_everything accept this range
SEED_RANGE = (0, 2**32 - 1)
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "64", "bf16", "16")
# what train() returns to a sweeper must be one of the metrics a run logs
METRICS = (
    "val/loss_best",
    "val/loss",
    "val/acc",
    "val/bpc",
    "train/loss",
    "train/acc",
    "train/bpc",
    "train/loss_avg",
    "train/acc_avg",
)
# a checkpoint (weights + two AdamW moments, fp32) needs about 12 bytes per parameter; the atomic
# writer holds the old file and the new one at once, and a best and a last are written together
CHECKPOINT_BYTES_PER_PARAM = 12
PROVISIONAL_VOCAB = 256  # characters, for the checks made before the corpus is read (a byte's worth)


def require(cfg: Any, key: str, what: str) -> None:
    """A required key (`???` in the config) must be given on the command line."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg, key):
        raise ConfigError(f"{key} is required: {what}")


def check_seed(seed: Any) -> None:
    lo, hi = SEED_RANGE
    if not is_int(seed) or not lo <= seed <= hi:
        raise ConfigError(f"seed={seed!r} is invalid; it must be an integer from {lo} to {hi}")


def check_trainer(tcfg: Mapping) -> None:
    """Step counts, intervals, precision and devices that cannot work, named before the Trainer starts."""
    positive_int(
        "trainer.max_steps",
        tcfg.get("max_steps"),
        " (training batches are an endless stream, so a run needs a step count)",
    )
    positive_int(
        "trainer.val_check_interval",
        tcfg.get("val_check_interval"),
        " (validate every N optimizer steps; the training stream has no epochs to take a fraction of)",
    )
    limit = tcfg.get("limit_val_batches")
    if not ((is_int(limit) and limit >= 1) or (isinstance(limit, float) and 0 < limit <= 1)):
        raise ConfigError(
            f"trainer.limit_val_batches={limit!r} is invalid; it must be a share in (0, 1] (1.0 = the whole "
            "validation split) or a number of batches >= 1: a run without validation has no val loss to keep or return"
        )
    positive_int("trainer.log_every_n_steps", tcfg.get("log_every_n_steps"))
    positive_int("trainer.accumulate_grad_batches", tcfg.get("accumulate_grad_batches", 1))
    clip = tcfg.get("gradient_clip_val")
    if clip is not None and (not is_number(clip) or clip < 0):
        raise ConfigError(f"trainer.gradient_clip_val={clip!r} is invalid; it must be a number >= 0, or null for none")
    precision = tcfg.get("precision")
    if str(precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    import torch

    from shakegpt.hardware import device_kind, on_cuda

    devices, accelerator = tcfg.get("devices"), str(tcfg.get("accelerator"))
    gpu_wanted = on_cuda(accelerator)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no usable GPU; use trainer.accelerator=cpu or auto"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            "trainer.accelerator=mps but torch finds no Apple GPU here (MPS needs Apple silicon and macOS 12.3 or "
            "later); use trainer=cpu, or trainer.accelerator=auto to take the GPU where there is one"
        )
    if is_int(devices):
        mps = device_kind(accelerator) == "mps"
        available = 1 if mps else torch.cuda.device_count() if gpu_wanted else (os.cpu_count() or 1)
        kind = "Apple GPU" if mps else "GPUs" if gpu_wanted else "CPU cores (one process per device)"
        if devices < 1 or devices > available:
            raise ConfigError(
                f"trainer.devices={devices} is invalid; this machine has {available} {kind}: use 1 to {available}"
            )


def check_sample_section(sample: Mapping, prefix: str) -> None:
    check_sampling(sample.get("temperature"), sample.get("top_k"), sample.get("top_p"), prefix)
    non_negative_int(f"{prefix}num_chars", sample.get("num_chars"))
    prompt = sample.get("prompt")
    if sample.get("num_chars") and not sample.get("prompt_file") and (not isinstance(prompt, str) or not prompt):
        raise ConfigError(f"{prefix}prompt={prompt!r} is invalid; give at least one character, e.g. a newline")
    seed = sample.get("seed")
    if seed is not None:
        try:
            check_seed(seed)
        except ConfigError:
            raise ConfigError(
                f"{prefix}seed={seed!r} is invalid; it must be an integer from 0 to {SEED_RANGE[1]}"
            ) from None


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | Path, label: str, need_bytes: int = 0) -> None:
    """`path` (a folder to be written, existing or not) can be made and written, with `need_bytes`
    free; `label` names it in the message. Tried for real: a temporary file is made in the nearest
    existing folder."""
    path = Path(path).expanduser()
    base = nearest_existing(path)
    if not base.is_dir():
        raise ConfigError(f"{label} cannot be made: {base} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        reason = "a read-only file system" if e.errno == errno.EROFS else (e.strerror or type(e).__name__)
        raise ConfigError(f"{label} cannot be written ({base}: {reason}); choose a writable folder") from None
    free = shutil.disk_usage(base).free
    if need_bytes and free < need_bytes:
        raise ConfigError(
            f"{label}: only {free / 2**20:.1f} MiB free on its disk, a checkpoint of this model needs about "
            f"{need_bytes / 2**20:.1f} MiB; free some space or choose another folder"
        )


def checkpoint_bytes(model_cfg: Mapping) -> int:
    """About what one training checkpoint of this model takes on disk (weights and AdamW moments)."""
    import torch

    from shakegpt.model import GPT, GPTConfig

    with torch.device("meta"):  # counts parameters without allocating them
        n = GPT(GPTConfig.from_dict(dict(model_cfg))).num_params()
    return n * CHECKPOINT_BYTES_PER_PARAM + (1 << 20)


def _container(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def check_path_exists(value: Any, key: str = "ckpt_path") -> None:
    """A checkpoint, run directory or bundle that is not there, refused before torch is imported."""
    if value and not Path(str(value)).expanduser().exists():
        raise CheckpointError(f"{key}={value} does not exist; give a .ckpt file or a run directory")


def check_train_config(
    cfg: DictConfig, output_dir: str | Path | None = None, check_ckpt: bool = True, claimed_after: bool = False
) -> None:
    """Every check that needs no corpus: optimizer, seed, trainer, data, model, sampling, resume,
    the returned metric, and the run directory (writable, free space, not another run's).
    `claimed_after`: the run gets `output_dir` or a free numbered variant of it once the checks pass
    (a default-named run), so another run's checkpoints already there do not concern it."""
    if check_ckpt:
        check_path_exists(cfg.get("ckpt_path"))  # before the imports below: a typo is told at once
    from shakegpt.corpus import TINYSHAKESPEARE_SHA256, TINYSHAKESPEARE_URL, check_source
    from shakegpt.hardware import check_compile
    from shakegpt.model import GPTConfig
    from shakegpt.optim import check_optim
    from shakegpt.training.checkpoint import check_resumable
    from shakegpt.training.data import check_data

    check_seed(cfg.get("seed"))
    if not isinstance(cfg.get("new_run_dir", False), bool):
        raise ConfigError(f"new_run_dir={cfg.get('new_run_dir')!r} is not one of true, false")
    check_compile(cfg.get("compile", "auto"))
    check_optim(_container(cfg.optim))
    check_trainer(_container(cfg.trainer))
    data = _container(cfg.data)
    check_data(data.get("batch_size"), data.get("seq_len"), data.get("val_fraction"), data.get("num_workers", 0))
    check_source(data.get("path"), data.get("url", TINYSHAKESPEARE_URL), data.get("sha256", TINYSHAKESPEARE_SHA256))
    if data.get("path") and not Path(data["path"]).expanduser().is_file():
        raise DataError(f"data.path={data['path']} does not exist or is not a file")
    model = _container(cfg.model)
    # the presets leave model.vocab_size null until the corpus is read (in train()); a provisional size
    # serves the checks that do not depend on it
    derived = model.get("vocab_size") is None
    mcfg = GPTConfig.from_dict(model, vocab_size=PROVISIONAL_VOCAB)
    if data["seq_len"] > mcfg.max_seq_len:
        raise ConfigError(
            f"data.seq_len={data['seq_len']} exceeds model.max_seq_len={mcfg.max_seq_len}; "
            "lower data.seq_len or raise model.max_seq_len"
        )
    check_sample_section(_container(cfg.sample), "sample.")
    text_sample = (cfg.get("callbacks") or {}).get("text_sample")
    if text_sample is not None:
        check_sample_section(_container(text_sample), "callbacks.text_sample.")
    metric = cfg.get("optimized_metric")
    if metric is not None and metric not in METRICS:
        raise ConfigError(f"optimized_metric={metric!r} is not a metric a run logs; choose one of {', '.join(METRICS)}")
    if cfg.get("ckpt_path") and check_ckpt:  # (train() checks it itself, with the corpus's vocabulary)
        optimizer = cfg.optim.get("name", "adamw")
        check_resumable(cfg.ckpt_path, mcfg, cfg.trainer.max_steps, optimizer=optimizer, vocab_size_unknown=derived)
    check_trainer_with_lightning(cfg.trainer)  # last: it imports Lightning, seconds that a bad value above is spared
    check_loggers(cfg.get("logger"))
    if output_dir is not None:
        if not claimed_after:
            check_run_directory(Path(output_dir), resuming=bool(cfg.get("ckpt_path")))
        need = checkpoint_bytes(mcfg.to_dict())
        check_writable(output_dir, f"the run directory {output_dir}", need)
        for folder in written_folders(cfg):  # one that is already there may be what cannot be written
            if folder.is_dir() and folder != Path(output_dir):
                check_writable(folder, f"the run's {folder.name}/ folder {folder}", need)


def written_folders(cfg: DictConfig) -> list[Path]:
    """The folders the config's callbacks (`dirpath`) and loggers (`save_dir`/`name`/`version`, as
    Lightning joins them) write into, wherever the config puts them."""
    folders = [c.get("dirpath") for c in (cfg.get("callbacks") or {}).values() if c]
    for logger in (cfg.get("logger") or {}).values():
        if logger and logger.get("save_dir"):
            parts = [logger.get("name"), logger.get("version")]
            folders.append(str(Path(logger.save_dir, *(p for p in parts if isinstance(p, str)))))
    return sorted({Path(f) for f in folders if f})


_checked_up_front: set[str] = set()


def checked_up_front(output_dir: str | Path) -> None:
    """Mark the run in `output_dir` as checked (by the Hydra callback, before its directory was made)."""
    _checked_up_front.add(str(Path(output_dir).absolute()))


def take_checked_up_front(output_dir: str | Path) -> bool:
    """Whether the run in `output_dir` was checked up front; the mark is used up, so a second run in
    the same directory in this process is checked again."""
    key = str(Path(output_dir).absolute())
    if key in _checked_up_front:
        _checked_up_front.discard(key)
        return True
    return False


def check_loggers(loggers: Any) -> None:
    """A logger whose library is not installed, named before the run starts. A logger class says
    what it needs with `NEEDS = (module, what to install)` (`shakegpt.training.trackers`)."""
    import importlib.util

    from hydra.utils import get_class

    for name, node in (loggers or {}).items():
        if node is None or "_target_" not in node:
            continue
        module, install = getattr(get_class(str(node["_target_"])), "NEEDS", (None, None))
        try:
            found = module is None or importlib.util.find_spec(module) is not None
        except ValueError:  # a module set to None in sys.modules: as good as missing
            found = False
        if not found:
            raise ConfigError(f"logger={name} needs {module}, which is not installed: pip install '{install}'")


def check_trainer_with_lightning(trainer_node: Any) -> None:
    """Every Trainer argument the config passes, checked by Lightning's own rules: a Trainer is built
    from them (without loggers, callbacks or checkpoints; nothing runs and nothing is written). A
    refused value ends the run before its directory exists instead of at the Trainer's construction."""
    import logging
    import warnings

    from hydra.utils import instantiate

    node = _container(trainer_node)
    if node.get("precision") in (None, "auto"):  # shakegpt's own choice, resolved later per device
        node["precision"] = "32-true"
    node |= {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its start-up notes (GPU available, ...) belong to the run
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            instantiate(node)
    except Exception as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        text = " ".join(str(cause).split())
        given = ", ".join(
            f"trainer.{k}={trainer_node.get(k)}" for k in ("accelerator", "strategy", "devices", "num_nodes")
        )
        raise ConfigError(f"Lightning refuses the trainer config ({given}): {text[:300]}") from None
    finally:
        quiet.setLevel(level)


def check_run_directory(run_dir: Path, resuming: bool) -> None:
    """A new run must not write into a directory that holds another run's checkpoints: its
    `last.ckpt` and best checkpoint would replace that run's. Resuming (ckpt_path) may continue there."""
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) if run_dir.is_dir() else []
    if ckpts and not resuming:
        raise ConfigError(
            f"the run directory {run_dir} already holds another run's checkpoints ({', '.join(ckpts)}); "
            f"resume it with ckpt_path={run_dir}, or start this run in a new directory (leave hydra.run.dir unset)"
        )
