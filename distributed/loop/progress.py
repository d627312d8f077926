"""What the loop shows while it runs: a tqdm bar on a terminal, periodic log lines elsewhere."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys

log = logging.getLogger(__name__)

MODES = ("auto", "bar", "log", "none")
_SHOWN = ("loss", "grad_norm", "samples_per_sec")


def _fmt(values: dict, keep) -> str:
    """``k=v`` pairs of the kept numbers; an ensemble's per-member values (``*_member<i>``) stay
    in the records, out of the console line."""
    return " ".join(f"{k}={v:.4g}" for k, v in values.items()
                    if keep(k) and "_member" not in k and isinstance(v, (int, float)))


class Progress:
    """A tqdm bar (``"bar"``), log lines (``"log"``) or nothing (``"none"``).

    With a bar, console log records are written above it (tqdm's ``logging_redirect_tqdm``), so
    the bar and the logs never share a line; step metrics go to the bar's postfix and validation
    results to a log line as they come.

    Args:
        mode: one of `MODES` (``"auto"``: a bar when stderr is a terminal, else log lines).
        total: the step the run will end at (its last step, ``max_steps`` included).
        initial: the step it starts from (after a resume).
    """

    def __init__(self, mode: str | bool, total: int, initial: int):
        if mode is True or mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = "none" if mode is False else mode
        if self.mode not in MODES:
            raise ValueError(f"progress mode {mode!r}; use one of {', '.join(MODES)}.")
        self.bar = None
        self._stack = contextlib.ExitStack()
        if self.mode == "bar":
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            size = shutil.get_terminal_size((0, 0))  # 0 x 0: a terminal of unknown size
            known = size.columns > 0 and size.lines > 0
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=known,
                            ncols=None if known else 100, nrows=None if known else 24)
            self._stack.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger()]))

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, host: dict) -> None:
        """Step metrics at a log point."""
        text = _fmt(host, lambda k: k in _SHOWN or k.startswith("lr"))
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
        elif self.mode == "log":
            log.info("step %d %s", step, text)

    def epoch(self, epoch: int, last: dict, validated: bool) -> None:
        """The end of an epoch; validation results, when there are new ones, as a line."""
        if self.mode == "log":
            log.info("epoch %d %s", epoch,
                     _fmt(last, lambda k: k.startswith("train_loss") or (validated and
                                                                         k.startswith("val_"))))
        elif self.mode == "bar" and validated:
            log.info("epoch %d %s", epoch, _fmt(last, lambda k: k.startswith(("train_loss",
                                                                                "val_"))))

    def close(self) -> None:
        self._stack.close()
        if self.bar is not None:
            self.bar.close()
