"""Errors a user can act on. The CLI prints them as one line and exits with code 2.

``DataError`` and ``MissingDataError`` are the data readers' errors: they are user errors (one line,
exit 2) and also a ``ValueError`` / ``FileNotFoundError``, so code that catches the built-in types still
catches them.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable

# A full disk or quota is the user's to fix (free space, write elsewhere), not a bug: a user error.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DATA_DIR_VARIABLE = "DECONVLAB_DATA_DIR"


class UserError(Exception):
    """A problem with the user's input: what was wrong, where, and what to do.

    Args:
        what: what was wrong.
        where: the file or config key at fault.
        fix: what to do about it.
    """

    def __init__(self, what: str, where: str = "", fix: str = "") -> None:
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = f" ({self.where})" if self.where else ""
        fix = f": {self.fix}" if self.fix else ""
        return f"{self.what}{where}{fix}"

    def __reduce__(self):
        # Ray ships a trial's exception to the driver by pickling: keep the three parts apart.
        return type(self), (self.what, self.where, self.fix)


class DataError(UserError, ValueError):
    """Data that cannot be used: a file that is unreadable, corrupt, truncated, mismatched or out of range,
    or a ``data.*`` setting the data cannot satisfy (an unknown split, a class count it does not have)."""


class MissingDataError(UserError, FileNotFoundError):
    """A data folder, split or file that does not exist (or a split with nothing in it).

    When the fault is the data folder itself (``where == "data.root"``) the fix also names
    ``DECONVLAB_DATA_DIR``: the real data sets' default roots hang off it (conf/paths/default.yaml).
    """

    def one_line(self) -> str:
        line = super().one_line()
        if self.where == "data.root" and DATA_DIR_VARIABLE not in line:
            line += f"; or set {DATA_DIR_VARIABLE} to the folder holding the data sets (default: ../shared/data)"
        return line


class AccessRefused(UserError):
    """The tracking server refused a request: no or wrong credentials (HTTP 401), or no permission on an
    experiment or registered model (HTTP 403). See :mod:`deconvlab.access`."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"did you mean 'quickstart'? "`` for the closest of ``choices`` to a mistyped ``word``, else ``""``.

    Ends with a space so it can lead a fix text; matching ignores case and a ``.yaml`` suffix.
    """
    choices = list(choices)
    by_key = {choice.lower(): choice for choice in choices}
    key = word.lower().removesuffix(".yaml").removesuffix(".yml")
    close = difflib.get_close_matches(key, list(by_key), n=1, cutoff=0.6)
    return f"did you mean {by_key[close[0]]!r}? " if close else ""


def choose_from(word: str, choices: Iterable[str], listing: str = "") -> str:
    """A fix text for an unknown name: the closest match first, then where to see every choice.

    Args:
        word: what the user typed.
        choices: the valid names.
        listing: the command that lists them (e.g. ``deconvlab list experiments``); when empty the
            choices themselves are listed.
    """
    choices = sorted(choices)
    rest = f"see {listing}" if listing else f"choose one of: {', '.join(choices) or '(none)'}"
    return f"{did_you_mean(word, choices)}{rest}"


def disk_full(exc: OSError) -> UserError:
    """The user error for a write that found the disk (or the quota) full."""
    where = exc.filename or "paths.root_dir"
    return UserError(f"disk full: {exc.strerror or exc}", str(where),
                     "free space, or write outputs elsewhere with DECONVLAB_OUTPUT_ROOT=DIR (paths.root_dir)")


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError behind ``exc``: itself, the cause a wrapper such as Hydra's instantiate() hides, or a
    full disk."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return disk_full(exc)
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, or its type when it has none (e.g. a bare MemoryError)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def was_interrupted(exc: BaseException | None) -> bool:
    """Ctrl-C: a KeyboardInterrupt, or the ``sys.exit(1)`` Lightning raises after handling one itself."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    return isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt)
