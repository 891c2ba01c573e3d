"""How run directories are named and claimed, and the Hydra callback that checks a run's config
before Hydra makes its directory.

Names (conf/hydra/default.yaml):
- a run: `outputs/runs/<date>_<time>_<model preset>`, e.g. `outputs/runs/2026-11-30_19-42-07_v3`;
  a second run started in the same second gets `..._v3-2`, a third `..._v3-3`. The name is claimed
  with an atomic `mkdir`, so two runs started together never share a directory.
- a sweep: `outputs/multiruns/<date>_<time>` (claimed the same way), one sub-directory per job,
  `<job number>_<the overrides the sweep varies>`, with a group's `/` written `-`; overrides longer than
  `shakegpt.run.configs.MAX_NAME_BYTES` are cut and end in a hash of the whole (`path_safe`), so every
  name fits any file system (255 bytes a name) and stays distinct.
A directory given on the command line (`hydra.run.dir=…`, `hydra.sweep.dir=…`) is used as given.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write

from shakegpt.errors import EVENT_FILES, JOB_ERROR_FILE, ConfigError, ShakeGPTError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks there; runs go unlocked
    fcntl = None
from shakegpt.run.console import quoted

MAX_CLAIM_TRIES = 1000
log = logging.getLogger(__name__)


def claim(base: Path) -> Path:
    """Create `base`, or `base-2`, `base-3`, … whichever is free first, atomically: of several
    processes claiming the same name at once, each gets its own directory."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, MAX_CLAIM_TRIES + 1):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{base} and {MAX_CLAIM_TRIES - 1} numbered variants of it exist already")


def given_on_command_line(config: DictConfig, key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in config.hydra.overrides.hydra)


def run_dir_of(ckpt_path: Any) -> Path | None:
    """The run directory a resume's `ckpt_path` names (the directory itself, or the one whose
    checkpoints/ holds the file), or None when it is not in one."""
    if not ckpt_path:
        return None
    p = Path(str(ckpt_path)).expanduser()
    if p.is_file():
        run = p.parent.parent if p.parent.name == "checkpoints" else None
    elif p.is_dir():
        run = p.parent if p.name == "checkpoints" else p
    else:
        run = None
    return run if run is not None and (run / ".hydra").is_dir() else None


def keep_previous_record(run_dir: Path) -> None:
    """Before a resumed run writes its own `.hydra/` (config and overrides), keep the one already
    there as `.hydra.1`, `.hydra.2`, …: the settings each part of the run was trained with stay."""
    record = run_dir / ".hydra"
    if record.is_dir():
        n = 1
        while (run_dir / f".hydra.{n}").exists():
            n += 1
        record.rename(run_dir / f".hydra.{n}")


LOCK_FILE = ".lock"
_held: dict[Path, Any] = {}


def lock_run_dir(run_dir: Path) -> None:
    """Hold `<run dir>/.lock` while this process runs there; a second process (a second resume into
    the same directory) is refused in one line naming the first. The lock is the operating system's
    (`flock`): it goes with the process, so a killed run's lock never blocks its resume. A DDP rank
    started by rank 0 (or by torchrun, beside it) runs in rank 0's directory under rank 0's lock."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("RANK", "0") != "0" or fcntl is None:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 (held open for the process's life)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(
            f"the run directory {run_dir} is in use by {holder}; wait for it to end or stop it "
            "(a second run writing there would interleave its logs and checkpoints)"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}\n")
    f.flush()
    _held[run_dir.resolve()] = f


def release_run_dir_locks() -> None:
    """At the command's end (a test or a notebook may run it again in the same process)."""
    while _held:
        _, f = _held.popitem()
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def write_sweep_summary(sweep_dir: Path, heading: str = "best first") -> str | None:
    """The sweep's table (its jobs so far, best first) on the terminal and in <sweep dir>/summary.md;
    None when no job has a directory yet."""
    from shakegpt.run.records import sweep_table

    try:
        text = sweep_table(sweep_dir)
    except (ShakeGPTError, OSError):
        return None
    with contextlib.suppress(OSError):  # a read-only sweep directory: the table is still printed
        (sweep_dir / "summary.md").write_text(text + "\n")
    print(f"\nsweep {sweep_dir}, {heading}:\n{text}", flush=True)
    return text


def claimed_run_dir(forget: bool = False) -> Path | None:
    """The directory of the single run this process started, or None (none yet, or a sweep);
    `forget=True` at a command's start, so that a second run in the same process never sees the first's."""
    if forget:
        PrepareRun.claimed = None
    return PrepareRun.claimed


class PrepareRun(Callback):
    """Before Hydra makes a run's directory: check the whole config (one line naming the bad value,
    nothing created), then claim a directory no other run uses. For a sweep, claim its directory; a
    grid sweep's jobs are all checked first (a bad one refuses the sweep before any job runs), and a
    sweeper that picks its jobs as it goes (Optuna) has each job checked when it starts, so that a
    bad one fails alone."""

    claimed: Path | None = None  # the single run's directory, once claimed (`claimed_run_dir`)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from shakegpt.run.checks import check_train_config, checked_up_front

        HydraConfig.instance().set_config(config)  # so that ${hydra:...} resolves in the checks
        explicit = given_on_command_line(config, "hydra.run.dir")
        target = Path(str(config.hydra.run.dir))
        resumed = None if explicit or config.get("new_run_dir") else run_dir_of(config.get("ckpt_path"))
        if resumed is not None:  # continue the run where it is
            target, explicit = resumed, True
        try:
            self._set_output_dir(config, target)
            check_train_config(config, target, claimed_after=not explicit)
            rank = torchrun_rank()
            if rank is not None:  # one run directory for every rank torchrun started: rank 0's
                target = agreed_run_dir(rank, lambda: target if explicit else claim(target))
                self._set_output_dir(config, target)
                if rank != 0:  # as Lightning's own DDP ranks: a log of their own, no second .hydra/
                    self._as_other_rank(config, rank)
            elif not explicit:
                target = claim(target)
                self._set_output_dir(config, target)
            lock_run_dir(target)
            if resumed is not None:
                keep_previous_record(target)
            checked_up_front(target)  # train() need not check the same config again
            PrepareRun.claimed = target
        except ShakeGPTError as e:  # the user's to fix: one line, and nothing made
            raise SystemExit(f"error: {e}") from None
        except OSError as e:  # checked writable a moment ago: the disk changed under us
            raise SystemExit(f"error: the run directory {target} cannot be made: {e.strerror or e}") from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._tell_jobs_what_is_swept(config)
        jobs = grid_jobs(config)
        if jobs:
            refuse_bad_jobs(config, jobs)
        if given_on_command_line(config, "hydra.sweep.dir"):
            return
        HydraConfig.instance().set_config(config)
        try:
            sweep_dir = str(claim(Path(str(config.hydra.sweep.dir))))
        except OSError as e:
            raise SystemExit(
                f"error: hydra.sweep.dir={config.hydra.sweep.dir} cannot be made: {e.strerror or e}"
            ) from None
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = sweep_dir
            # each job's config is composed again from the sweep's overrides: it must name this one
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={quoted(sweep_dir)}")

    @staticmethod
    def _tell_jobs_what_is_swept(config: DictConfig) -> None:
        """A job sees only its own overrides; the keys the sweep varies travel to it in its config.
        Its directory is named by those alone (`3_model=v3,optim.lr=0.001`): what every job shares
        would make every name long and the same."""
        swept = swept_keys(config)
        exclude = list(config.hydra.job.config.override_dirname.exclude_keys)
        if swept:
            shared = [str(o).split("=", 1)[0].lstrip("+~") for o in config.hydra.overrides.task if "=" in str(o)]
            exclude += [k for k in shared if k not in swept and k not in exclude]
        listed = ",".join(quoted(k) for k in exclude)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra.append(f"++hydra.job.env_set.{SWEPT}={quoted(','.join(swept))}")
            config.hydra.overrides.hydra.append(f"hydra.job.config.override_dirname.exclude_keys=[{listed}]")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """The sweep's jobs, best first, on the terminal and in <sweep dir>/summary.md."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
            shutil.rmtree(sweep_dir, ignore_errors=True)  # no job ran (an empty range): nothing to keep
            print(f"the sweep ran no job (its overrides give none): {sweep_dir} removed", flush=True)
            return
        if write_sweep_summary(sweep_dir) is None:
            return  # no job got as far as a directory of its own: nothing to sum up
        jobs = sum(1 for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())
        note = study_note(config.hydra.sweeper, jobs)
        if note:
            print(note, flush=True)
            with (sweep_dir / "summary.md").open("a", encoding="utf-8") as f:
                f.write(f"\n{note}\n")
        failed = sorted(p.parent.name.split("_", 1)[0] for p in sweep_dir.glob(f"*/{JOB_ERROR_FILE}"))
        if failed and not sweeper_records_failures(config.hydra.sweeper):
            raise SystemExit(
                f"error: {len(failed)} job(s) of the sweep failed (job {', '.join(failed)}): "
                f"each job's train.log in {sweep_dir} has its error and traceback"
            )

    @staticmethod
    def _as_other_rank(config: DictConfig, rank: int) -> None:
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.output_subdir = None
            config.hydra.job.name = f"{config.hydra.job.name}_rank_{rank}"

    @staticmethod
    def _set_output_dir(config: DictConfig, target: Path) -> None:
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = str(target)
            config.hydra.runtime.output_dir = str(target.absolute())


def torchrun_rank() -> int | None:
    """This process's global rank where torchrun (torch.distributed.run) started it, else None."""
    if "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"])
    return None


TORCHRUN_KEY = "shakegpt/run_dir"
TORCHRUN_WAIT = timedelta(minutes=10)  # rank 0 checks the config and reads nothing large before it answers


def agreed_run_dir(rank: int, choose: Callable[[], Path]) -> Path:
    """The run directory every rank of a torchrun job uses: rank 0 chooses it (`choose`), and tells
    the others through the key-value store torchrun's agent already runs at MASTER_ADDR:MASTER_PORT
    (the one the process group joins later). Rank 0 sets the key only where it is not set yet."""
    from torch.distributed import TCPStore

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        raise ConfigError(
            "this torchrun's rendezvous keeps no store that shakegpt can share the run directory through; "
            "give every rank the same one: hydra.run.dir=outputs/runs/<name>"
        )
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=TORCHRUN_WAIT)
    if rank == 0 and not store.check([TORCHRUN_KEY]):
        store.set(TORCHRUN_KEY, str(choose()))
    return Path(store.get(TORCHRUN_KEY).decode())


SWEPT = "SHAKEGPT_SWEPT"  # the variable (hydra.job.env_set) that names a sweep's varied keys to its jobs


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a sweep varies: command-line overrides with several values (`model=v1,v3`,
    `optim.lr=interval(…)`) and the sweeper's own `params` (an Optuna search space)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [str(o) for o in config.hydra.overrides.task]
    lines += [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    keys = []
    for o in OverridesParser.create().parse_overrides(lines):
        if o.is_sweep_override() and o.key_or_group not in keys:
            keys.append(o.key_or_group)
    return keys


def grid_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, in job order, of a sweep whose jobs are known before it starts (Hydra's
    grid sweeper: every combination of the swept values, a key given twice taking its last value);
    None for a sweeper that picks its jobs as it goes (Optuna)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if sweeper_records_failures(config.hydra.sweeper):
        return None
    lines = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    lines += [str(o) for o in config.hydra.overrides.task]
    options: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides(lines):
        key = o.get_key_element()
        if not o.is_sweep_override():
            options[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            options[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:  # an interval: the grid sweeper refuses it itself
            return None
    return [list(job) for job in itertools.product(*options.values())]


def refuse_bad_jobs(config: DictConfig, jobs: list[list[str]]) -> None:
    """Check every job's config as a single run's is checked (nothing made): the first bad job, and
    how many more, refuse the sweep in one line before any job runs."""
    from hydra.core.global_hydra import GlobalHydra

    from shakegpt.run.checks import check_train_config

    loader, swept, bad = GlobalHydra.instance().config_loader(), swept_keys(config), []
    try:
        for num, overrides in enumerate(jobs):
            job = loader.load_sweep_config(config, overrides)
            HydraConfig.instance().set_config(job)  # so that ${hydra:...} resolves in the checks
            try:
                check_train_config(job)
            except ShakeGPTError as e:
                bad.append((num, overrides, e))
    finally:
        HydraConfig.instance().set_config(config)
    if bad:
        num, overrides, error = bad[0]
        shown = " ".join(o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept)
        more = f"; {len(bad) - 1} more job(s) refused too" if len(bad) > 1 else ""
        raise SystemExit(f"error: job {num} ({shown}): {str(error).rstrip('.')}{more}; no job of the sweep ran")


def run_identity() -> tuple[list[str], str]:
    """What sets the current run apart, for TensorBoard: the keys that differ (in a sweep, the swept
    keys; for a single run, its command-line overrides) and a short, distinct name: a sweep job's
    number and swept values (`3: v3 0.001`), a single run's directory name."""
    hc = HydraConfig.get()
    task = [str(o).split("=", 1) for o in hc.overrides.task if "=" in str(o)]
    if hc.mode == RunMode.MULTIRUN:
        swept = [k for k in str(hc.job.env_set.get(SWEPT, "")).split(",") if k]
        values = [v for k, v in task if k.lstrip("+~") in swept]
        return swept, f"{hc.job.num}: {' '.join(values)}" if values else str(hc.job.num)
    return [k for k, _ in task], Path(hc.runtime.output_dir).name


def sweeper_records_failures(sweeper: DictConfig) -> bool:
    """Whether the sweeper records a failed job and goes on (Optuna: a FAIL trial, within
    max_failure_rate), rather than ending the sweep at the first failure (Hydra's grid sweeper)."""
    return "BasicSweeper" not in str(sweeper.get("_target_", ""))


def optuna_study(sweeper: DictConfig) -> Any:
    """The Optuna study a sweep runs in, where it is kept in a storage (None otherwise: a study in
    memory ends with the process, and Hydra's other sweepers keep none)."""
    if "optuna" not in str(sweeper.get("_target_", "")).lower() or not sweeper.get("storage"):
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=str(sweeper.study_name), storage=str(sweeper.storage))
    except KeyError:  # no such study yet
        return None


def fail_interrupted_trials(sweeper: DictConfig) -> list[int]:
    """When a signal stops an Optuna sweep: its trials still RUNNING in the study's storage are marked
    FAIL (the sweeper would otherwise leave them RUNNING for good, and a continued study would count
    them as under way). Returns their numbers."""
    from optuna.trial import TrialState

    study = optuna_study(sweeper)
    if study is None:
        return []
    running = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for t in running:
        study._storage.set_trial_state(t._trial_id, TrialState.FAIL)
    return [t.number for t in running]


def end_stopped_sweep() -> None:
    """When a signal stops a sweep's job (before or during training): the sweep ends there, so its
    table of the jobs so far is written as at its end, and an Optuna trial left RUNNING is marked FAIL."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hc = HydraConfig.get()
    write_sweep_summary(Path(hc.sweep.dir), "stopped; its jobs so far, best first")
    failed = fail_interrupted_trials(hc.sweeper)
    if failed:
        log.info("Optuna trial(s) %s marked failed in %s", ", ".join(map(str, failed)), hc.sweeper.storage)


def study_note(sweeper: DictConfig, jobs: int) -> str | None:
    """A line for the end of an Optuna sweep whose study holds trials of earlier sweeps too: the
    "Best value" Optuna prints is the study's, which this sweep's table need not contain."""
    from optuna.trial import TrialState

    study = optuna_study(sweeper)
    if study is None:
        return None
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(study.trials) <= jobs or not done:
        return None
    best = study.best_trial
    return (
        f"note: study {study.study_name!r} in {sweeper.storage} holds {len(study.trials)} trials, "
        f"{len(study.trials) - jobs} of them from earlier sweeps; Optuna's 'Best value' is the study's best, "
        f"{best.value:.4f} (trial {best.number}); this sweep's own jobs are in the table"
    )


def record_job_failure(job_dir: Path, error: BaseException) -> None:
    """Leave a failed sweep job's one-line error in its directory, for the sweep's table."""
    with contextlib.suppress(OSError):
        (job_dir / JOB_ERROR_FILE).write_text(f"{error}\n")


def remove_if_empty(run_dir: Path) -> None:
    """Delete the directory of a run that stopped before training started: it holds only Hydra's
    record, its lock and a log ending in the error just printed, and would clutter outputs/."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log", LOCK_FILE}:
        shutil.rmtree(run_dir, ignore_errors=True)


# what a run writes into its directory before its first step; a stopped run's directory is emptied of these only
RUN_ENTRIES = (".hydra", "train.log", "csv", "hparams.yaml", "record.jsonl", "checkpoints", LOCK_FILE)


def remove_unstarted(run_dir: Path) -> None:
    """Delete what a run stopped before its first step wrote, and its directory if nothing else is
    in it (a directory given with hydra.run.dir may hold a user's own files: those stay)."""
    if not run_dir.is_dir() or any((run_dir / "checkpoints").glob("*.ckpt")):
        return
    for path in [run_dir / name for name in RUN_ENTRIES] + list(run_dir.glob(EVENT_FILES)):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()
