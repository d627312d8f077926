"""Flags and config files -> `TrainConfig`.

Every `TrainConfig` field is an absl flag of the same name. ``--config=FILE`` (JSON or YAML: a
mapping of field names to values, e.g. a run's own ``config.json``) sets fields; flags given on
the command line override it; the rest keep their defaults. ``--help`` prints the flags grouped
by topic (`distributed.cli.config.GROUPS`) and exits 0.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from absl import flags

from .config import GROUPS, TrainConfig, config_fields, from_dict

FLAGS = flags.FLAGS
_MODULE = "distributed.train"
HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def define() -> None:
    """Define one absl flag per `TrainConfig` field (and ``--config``); idempotent."""
    for f in config_fields():
        if f.name in FLAGS:
            continue
        define_fn = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                     float: flags.DEFINE_float, str: flags.DEFINE_string}[type(f.default)]
        define_fn(f.name, f.default, f.metadata.get("help", f.name), module_name=_MODULE)
    if "config" not in FLAGS:
        flags.DEFINE_string("config", "", "A JSON or YAML file of config fields (e.g. a run's "
                            "config.json); flags given on the command line override it.",
                            module_name=_MODULE)


def help_text(prog: str = "python -m distributed.train") -> str:
    """Usage and every flag, grouped by topic, with its default."""
    intro = ("Trains a model (default: the PSF field model on its embedded star field) and "
             "writes config.json, metrics.jsonl, summary.json, checkpoints/ and model.eqx into "
             "--workdir. Re-running a command resumes it.")
    out = [f"usage: {prog} [--flag=value ...]", "", *textwrap.wrap(intro, 100), ""]
    fields = config_fields()
    extra = [("config", "", FLAGS["config"].help)] if "config" in FLAGS else []
    for group in GROUPS:
        rows = [(f.name, f.default, f.metadata["help"]) for f in fields
                if f.metadata["group"] == group]
        if group == "run":
            rows += extra
        out.append(f"{group}:")
        for name, default, text in rows:
            shown = json.dumps(default) if isinstance(default, str) else str(default).lower() \
                if isinstance(default, bool) else str(default)
            out.append(f"  --{name}={shown}")
            out += textwrap.wrap(text, 96, initial_indent="      ", subsequent_indent="      ")
        out.append("")
    out.append("Exit codes: 0 done, 1 diverged, 2 bad input, 3 stalled, 42 preempted.")
    return "\n".join(out) + "\n"


def read_config_file(path: str) -> dict[str, Any]:
    """The field values of a JSON or YAML config file.

    Raises:
        ValueError: an unreadable file, not a mapping, or unknown field names (naming them).
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--config={path}: cannot read it ({e.strerror}); give the path of a "
                         f"JSON or YAML file.") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except ValueError as e:  # json.JSONDecodeError and yaml.YAMLError are ValueErrors
        raise ValueError(f"--config={path} is not valid {p.suffix.lstrip('.') or 'JSON'} "
                         f"({str(e).splitlines()[0]}).") from None
    except Exception as e:  # noqa: BLE001 - yaml's own error types
        raise ValueError(f"--config={path} is not valid YAML ({str(e).splitlines()[0]}).") \
            from None
    if not isinstance(values, dict):
        raise ValueError(f"--config={path} must hold a mapping of field names to values.")
    from_dict(values)  # unknown names and bad values are refused here, naming them
    return values


def config_from_flags() -> TrainConfig:
    """The config: the ``--config`` file's values, then the flags given on the command line
    (after `FLAGS` has parsed ``argv``).

    Raises:
        ValueError: a bad value, naming the flag (or field) and the fix.
    """
    values = read_config_file(FLAGS.config) if FLAGS.config else {}
    for f in config_fields():
        if FLAGS[f.name].present or f.name not in values:
            values[f.name] = getattr(FLAGS, f.name)
    return from_dict(values)
