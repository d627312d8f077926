"""The command line: ``python -m distributed.train [--flag=value ...]``.

Every `TrainConfig` field is a flag. Bad input ends with exit code 2 and one line naming the
value and the fix; a preempted run saves a checkpoint and exits with 42. This file only parses
flags, sets up logging and devices, and hands the config to `distributed.cli.run`.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from ..runtime.exit_codes import USAGE
from . import flags as cli_flags
from . import logs
from .conflicts import check_import_name

FLAGS = flags.FLAGS
log = logging.getLogger(__name__)
cli_flags.define()


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE)


def _parse_flags(argv: list[str]) -> list[str]:
    if any(a in cli_flags.HELP_FLAGS for a in argv[1:]):
        sys.stdout.write(cli_flags.help_text())
        sys.exit(0)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(f"{str(e).rstrip(' ?.')}. Run with --help to list the flags.")
    return []


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected positional argument(s) {argv[1:]}; every option is a --flag=value.")
    try:
        cfg = cli_flags.config_from_flags()
    except ValueError as e:
        _fail(str(e))
    from ..runtime.signals import StopRequest

    # Preemption on by default, from before jax starts: a signal during start-up, the first
    # compilation or a restore is remembered and handled at the first step boundary.
    stop = StopRequest().install()
    logs.console()
    from ..runtime.unraisable import route_closed_loop_callbacks_to_log

    route_closed_loop_callbacks_to_log()
    clash = check_import_name()
    if clash is not None:
        print(f"warning: {clash}", file=sys.stderr, flush=True)
    from ..runtime import configure_host_devices

    try:
        configure_host_devices(cfg.host_devices or None)
    except (ValueError, RuntimeError) as e:
        if cfg.host_devices:
            _fail(f"--host_devices={cfg.host_devices}: {e}")
        _fail(f"{e}; set it to a positive integer or unset it (or pass --host_devices=N).")
    from .run import run

    code = run(cfg, stop=stop)
    sys.exit(code)


def entry() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry()
