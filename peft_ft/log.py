"""One console for progress bars and log lines, plus the run folder's train.log."""

from __future__ import annotations

import logging
from pathlib import Path

_console = None


def console():
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console()
    return _console


def setup_logging(log_file: Path | None = None) -> logging.Logger:
    """Log lines go to the console (through rich, so they sit above a live progress bar) and,
    for a run, to `log_file` (the run folder's train.log)."""
    from rich.logging import RichHandler

    logger = logging.getLogger("peft_ft")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.addHandler(RichHandler(console=console(), show_path=False, show_time=False, markup=False))
    if log_file is not None:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger
