"""Progress bars with an estimate of the time left, for the long steps: tuning, latency tables,
corpus runs, fine-tuning.

A bar is drawn (with tqdm) only where someone watches: on a terminal (the stream is a TTY), and
unless the ``fxopt.progress`` logger, or ``fxopt`` above it, is set to ERROR or above
(``fxopt --quiet`` does; ``logging.getLogger("fxopt.progress").setLevel(logging.ERROR)`` does it
in a program). The root logger's level does not count: a program that never configures logging
still gets bars on a terminal. Everywhere else a bar is a no-op, and callers log their milestones
with ``logging`` (shown with ``fxopt --verbose``).

    with progress.bar(total=len(rows), desc="latency table", unit="conv") as bar:
        for row in rows:
            ...
            bar.update()
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Iterable, Iterator, TextIO

LOGGER = "fxopt.progress"

__all__ = ["LOGGER", "bar", "enabled", "iterate", "redirect_logging"]


def enabled(stream: TextIO | None = None) -> bool:
    """True when a bar on ``stream`` (default stderr) would be seen: a TTY, and not quietened
    (``fxopt.progress`` or ``fxopt`` set to ERROR or above)."""
    stream = stream if stream is not None else sys.stderr
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):  # closed or not a file
        return False
    logger: logging.Logger | None = logging.getLogger(LOGGER)
    while logger is not None and logger is not logging.root:
        if logger.disabled:
            return False
        if logger.level != logging.NOTSET:
            return logger.level <= logging.WARNING
        if not logger.propagate:
            break
        logger = logger.parent  # type: ignore[assignment]
    return True


class _Null:
    """What a bar is where nobody watches: every call does nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description_str(self, text: str) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Null":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def bar(total: int | None, desc: str, unit: str = "it", stream: TextIO | None = None, leave: bool = False,
        show: bool = True) -> Any:
    """A tqdm bar (``update(n)``, ``set_postfix_str(text)``, ``close()``; a context manager too)
    where it is seen (and ``show``), else a no-op with the same methods."""
    if not show or not enabled(stream):
        return _Null()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=stream if stream is not None else sys.stderr,
                leave=leave, dynamic_ncols=True, smoothing=0.1)


def iterate(iterable: Iterable, desc: str, total: int | None = None, unit: str = "it",
            stream: TextIO | None = None) -> Iterator:
    """``iterable`` with a bar over it (see :func:`bar`)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with bar(total, desc, unit, stream) as handle:
        for item in iterable:
            yield item
            handle.update()


@contextlib.contextmanager
def redirect_logging() -> Iterator[None]:
    """Log records written above a live bar instead of through it (for the CLI)."""
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        yield
        return
    with logging_redirect_tqdm():  # the root logger's console handler (fxopt's records propagate there)
        yield
