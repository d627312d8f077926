"""The one rule that decides every periodic action of the loop (logging, checkpoints, hooks,
validation): big_vision's ``itstime``."""

from __future__ import annotations


def itstime(count: int, every: int, *, first: bool = False, last: int | None = None) -> bool:
    """Whether an action with period ``every`` is due after ``count`` steps (or epochs).

    Due at the multiples of ``every`` (``every <= 0``: never, unless ``first``/``last`` say so),
    at ``count == 1`` with ``first``, and at ``count == last`` (the end) when ``last`` is given.
    """
    if count < 1:
        return False
    return (every > 0 and count % every == 0) or (first and count == 1) or (
        last is not None and count == last)
