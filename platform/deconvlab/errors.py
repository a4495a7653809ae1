"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


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
