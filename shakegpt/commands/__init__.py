"""The commands: each module is one command-line entry (`python -m shakegpt NAME`, or a console
script). They import the layers below them (the core, `shakegpt.training`, `shakegpt.run`), never
each other."""
