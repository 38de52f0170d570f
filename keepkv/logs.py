"""keepkv's diagnostics: the ``"keepkv"`` :mod:`logging` logger and tqdm progress bars.

Library code logs to ``logging.getLogger("keepkv")`` (or a child, ``keepkv.<module>``) and never prints
diagnostics; standard output is left to actual results (generated text, tables, JSON). As a library keepkv installs
no handler of its own beyond a :class:`logging.NullHandler`: an application decides what is shown. The command line
calls :func:`configure_cli_logging`: messages go to standard error as ``[keepkv] message``, at ``INFO`` by default,
``DEBUG`` with ``--verbose`` and ``WARNING`` with ``--quiet``.

Progress bars (:func:`progress`) are tqdm bars on standard error, shown only when standard error is a terminal and
the ``"keepkv"`` logger lets ``INFO`` through (so ``--quiet`` and non-interactive runs, tests and pipes get none).
They wrap host-side loops only (GGUF dequantisation, prefill chunks), never a compiled graph.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

LOGGER_NAME = "keepkv"
VERBOSITY_LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}
CLI_FORMAT = "[keepkv] %(message)s"
PREFILL_PROGRESS_MIN_CHUNKS = 8  # prompts of at least this many prefill chunks get a progress bar

logger = logging.getLogger(LOGGER_NAME)
logger.addHandler(logging.NullHandler())

T = TypeVar("T")


def get_logger(name: str) -> logging.Logger:
    """The logger of a keepkv module: ``get_logger(__name__)`` gives ``keepkv.<module>``, a child of ``"keepkv"``."""
    return logging.getLogger(name if name.startswith(LOGGER_NAME) else f"{LOGGER_NAME}.{name}")


class _CLIHandler(logging.StreamHandler):
    """The command line's handler: writes to whatever ``sys.stderr`` is when a record is emitted."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(CLI_FORMAT))

    @property
    def stream(self):  # noqa: D102 (logging's attribute)
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always follows sys.stderr
        pass


def configure_cli_logging(verbosity: str = "normal") -> logging.Logger:
    """Show the ``"keepkv"`` logger's messages on standard error at ``verbosity`` (``quiet``: warnings and errors;
    ``normal``: + info; ``verbose``: + debug). Idempotent: calling it again replaces the previous CLI handler."""
    if verbosity not in VERBOSITY_LEVELS:
        raise ValueError(f"verbosity must be one of {tuple(VERBOSITY_LEVELS)}, got {verbosity!r}")
    for handler in [h for h in logger.handlers if isinstance(h, _CLIHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(_CLIHandler())
    logger.setLevel(VERBOSITY_LEVELS[verbosity])
    logger.propagate = False  # the CLI's handler is the only output; no duplicate through the root logger
    return logger


def progress_enabled() -> bool:
    """Whether progress bars are shown: standard error is a terminal and ``INFO`` messages are on."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and logger.isEnabledFor(logging.INFO)


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it",
             min_total: int = 1) -> Iterator[T] | Iterable[T]:
    """``iterable`` behind a tqdm bar on standard error when :func:`progress_enabled` and ``total`` (known length)
    is at least ``min_total``; else ``iterable`` itself (no overhead, no import of tqdm)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if (total is not None and total < min_total) or not progress_enabled():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
