"""`python train.py ARGS…` (also `python -m shakegpt ARGS…`, `shakegpt-train`): train one model, or
sweep many with `-m`, from the configs in conf/."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from shakegpt.run.configs import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from shakegpt.run.train import run_job  # torch and Lightning: not needed for --help or a refused value

    return run_job(cfg)


if __name__ == "__main__":
    main()
