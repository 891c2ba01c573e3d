"""The run layer: the only code that sees a Hydra config (a DictConfig). It turns a composed config into
one training run (`train`), claims and names run directories, checks what crosses components, glues
DDP into sweeps, and tells the terminal what happened. It imports the core and `shakegpt.training`."""
