"""Errors the command line turns into one line on stderr and exit code 2."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad user input: a file or option that cannot be used as given.

    ``path`` names the file (or option) at fault, ``problem`` says what is wrong with it in a few words.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem if self.path is None else f"{self.path}: {self.problem}"
        return " ".join(text.split())
