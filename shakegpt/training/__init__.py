"""The Lightning layer: the LightningModule and LightningDataModule, the callbacks, checkpoint I/O and
the exact validation pass. It imports the core (`shakegpt.*` modules) and Lightning, never Hydra or
OmegaConf: every class here is built from plain arguments, so a notebook needs no config system."""
