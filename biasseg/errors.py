"""Errors in what a user gave the program — files, folders, checkpoints, config keys — and how
the entry points report them.

Every such problem is an :class:`InputError` whose message is one line naming the file or key
and what is wrong with it (a :class:`DatasetError` lists several, one line each). The entry
points (``train.py``, ``evaluate.py``, ``predict.py``) print them and exit with status 1,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


class InputError(ValueError):
    """Something the user gave is unusable; the message names it and the problem, in one line."""


class DatasetError(InputError):
    """Problems with the user's files, one line each, all of them collected before reporting."""

    def __init__(self, problems: Sequence[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        super().__init__(f"{count} found in the input data (nothing was written):\n" + "\n".join(f"  - {p}" for p in self.problems))


def input_error_in(error: BaseException) -> InputError | None:
    """The :class:`InputError` behind ``error`` (itself, or a cause: Hydra's ``instantiate``
    and Lightning wrap what constructors and hooks raise), None when there is none."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, InputError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__
    return None


def exit_on_input_error(run: Callable[[], T]) -> T:
    """``run()``; a problem with the user's input ends the program with its message, status 1."""
    try:
        return run()
    except Exception as error:
        cause = input_error_in(error)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(1)
