"""`python train.py ARGS…` (also `python -m shakegpt ARGS…`, `shakegpt-train`): train one model, or
sweep many with `-m`, from the configs in conf/."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from shakegpt.run.configs import CONF_DIR, hydra_errors_in_one_line
from shakegpt.run.rundir import claimed_run_dir, release_run_dir_locks
from shakegpt.run.signals import signals_raise, stopped_before_training


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def run(cfg: DictConfig) -> float | None:
    from shakegpt.run.train import run_job  # torch and Lightning: not needed for --help or a refused value

    return run_job(cfg)


def main() -> float | None:
    # Ctrl-C or SIGTERM before training starts (Hydra making the run, imports, the corpus) ends in one
    # line with no run directory left; Lightning handles both once fit runs
    claimed_run_dir(forget=True)
    with signals_raise(), hydra_errors_in_one_line():
        try:
            return run()
        except KeyboardInterrupt as e:
            stopped_before_training(e, claimed_run_dir())
        finally:
            release_run_dir_locks()


if __name__ == "__main__":
    main()
