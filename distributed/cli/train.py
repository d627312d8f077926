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
from .config import TrainConfig, config_fields

FLAGS = flags.FLAGS
log = logging.getLogger(__name__)


def _define_flags() -> None:
    for f in config_fields():
        help_text = f.metadata.get("help", f.name)
        define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                  float: flags.DEFINE_float, str: flags.DEFINE_string}[type(f.default)]
        if f.name not in FLAGS:
            define(f.name, f.default, help_text)


_define_flags()


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE)


def config_from_flags() -> TrainConfig:
    return TrainConfig(**{f.name: getattr(FLAGS, f.name) for f in config_fields()})


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e}. Run with --helpfull to list the flags.")
    return []


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected positional argument(s) {argv[1:]}; every option is a --flag=value.")
    try:
        cfg = config_from_flags()
    except ValueError as e:
        _fail(str(e))
    from ..runtime.signals import StopRequest

    # Preemption on by default, from before jax starts: a signal during start-up, the first
    # compilation or a restore is remembered and handled at the first step boundary.
    stop = StopRequest().install()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    for noisy in ("absl", "orbax", "jax"):  # Orbax logs every save phase at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
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
