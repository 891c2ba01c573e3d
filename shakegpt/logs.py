"""How shakegpt's log lines reach the terminal and train.log: `FILE_ONLY` marks a detail for the log
file alone, and `TqdmHandler` prints the rest above the progress bar (conf/hydra/job_logging)."""

from __future__ import annotations

import logging

from tqdm import tqdm

# `log.info(..., extra=FILE_ONLY)`: a detail for train.log that the terminal's header already sums up
FILE_ONLY = {"file_only": True}


class TqdmHandler(logging.StreamHandler):
    """A console handler that writes through `tqdm.write`, so a log line printed while the progress
    bar is drawn lands above the bar instead of being glued onto it. Records logged with
    `extra=FILE_ONLY` are left to the log file."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "file_only", False):
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)
