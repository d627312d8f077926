"""The run configuration: one frozen dataclass, validated with errors that name the fix.

Every field is a command-line flag of ``python -m distributed.train`` with the same name; the
help text of each field is its flag's help, and its group (``# -- group`` below) the flag's
section in ``--help``. No I/O here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from ..core.bcd import CYCLES as _CYCLES
from ..core.bcd import NONPARAM, PARAM
from ..core.optim import OPTIMIZERS, SCHEDULES
from ..core.sharding import STRATEGIES as SHARDINGS
from ..core.step import STEP_IMPLS
from ..engine.assembly import DEVICE_DATA
from ..loop.progress import MODES as PROGRESS

MODELS = ("psf", "mlp")
CYCLES = tuple(_CYCLES)
COMPUTE_DTYPES = ("float32", "bfloat16")
SWEEP_TARGETS: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "psf": {"lr_param": ((PARAM, "learning_rate"),),
            "lr_nonparam": ((NONPARAM, "learning_rate"),),
            "weight_decay": ((PARAM, "weight_decay"), (NONPARAM, "weight_decay"))},
    "mlp": {"learning_rate": (("all", "learning_rate"),),
            "weight_decay": (("all", "weight_decay"),)},
}
"""Per ``--model``: each ``--sweep`` field -> the (block, optimizer setting) it sets."""
SWEEP_FIELDS = ("learning_rate", "lr_param", "lr_nonparam", "weight_decay")


GROUPS = ("run", "data", "mesh and sharding", "multi-process", "BCD and epochs", "optimizer",
          "checkpointing", "reliability", "output")
"""The sections of ``--help``, in order; every field belongs to one."""


def _f(default: Any, help: str, group: str) -> Any:
    if group not in GROUPS:
        raise ValueError(f"unknown flag group {group!r}; add it to GROUPS.")
    return dataclasses.field(default=default, metadata={"help": help, "group": group})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # -- run
    workdir: str = _f("runs/default", "Run folder: config.json, metrics.jsonl, summary.json, "
                      "checkpoints/, model.eqx. Re-running with the same workdir resumes.", "run")
    model: str = _f("psf", f"Model to train: one of {MODELS}.", "run")
    seed: int = _f(0, "Seed of the model init, data split and data order.", "run")
    init_seed: int = _f(-1, "Seed of the model init alone (-1: --seed); the data split and "
                        "order still follow --seed.", "run")
    ensemble: int = _f(0, "Train K models at once (an ensemble: member i initialised from "
                       "--init_seed + i, all on the same batches), split over the mesh axis "
                       "'ensemble' (e.g. --mesh=ensemble:4,data:2). 0: one model, or one member "
                       "per --sweep value (a sweep's members all start from --init_seed).",
                       "run")
    max_steps: int = _f(0, "Stop after this many steps in total (0: no limit).", "run")
    force: bool = _f(False, "Reuse a workdir whose config.json differs from this run's (or a "
                     "non-empty folder that holds no run).", "run")
    # -- data
    data: str = _f("", "Your own data: a .npz or ArrayRecord file (glob allowed). Empty: the "
                   "model's embedded synthetic data.", "data")
    val_data: str = _f("", "Your own validation data (same arrays as --data); empty: "
                       "--val_fraction of --data.", "data")
    test_data: str = _f("", "Held-out test data (same arrays), scored at the end into "
                        "summary.json as test_*.", "data")
    val_fraction: float = _f(0.1, "Fraction of --data held out for validation.", "data")
    n_train: int = _f(512, "Embedded data: training examples.", "data")
    n_val: int = _f(128, "Embedded data: validation examples.", "data")
    n_test: int = _f(256, "Embedded PSF field: held-out test stars for the final report.",
                     "data")
    batch_size: int = _f(64, "Global batch size (split over data x fsdp and processes).", "data")
    device_data: str = _f("auto", f"Keep the training data on the devices and run many steps "
                          f"per dispatch (the same batches and results): one of {DEVICE_DATA} "
                          f"(auto: when the data fit).", "data")
    # -- mesh and sharding
    mesh: str = _f("data:-1,fsdp:1,tensor:1", "Mesh axes data/fsdp/tensor; -1 = the rest.",
                   "mesh and sharding")
    sharding: str = _f("auto", f"Parameter sharding: one of {SHARDINGS}.", "mesh and sharding")
    host_devices: int = _f(0, "CPU only: simulate this many devices (0: leave as is).",
                           "mesh and sharding")
    step_impl: str = _f("jit", f"Train step implementation: one of {STEP_IMPLS}.",
                        "mesh and sharding")
    compute_dtype: str = _f("float32", f"Forward/backward dtype: one of {COMPUTE_DTYPES}.",
                            "mesh and sharding")
    grad_accum: int = _f(1, "Micro-batches per step (gradient accumulation; the result equals "
                         "one full batch).", "mesh and sharding")
    # -- multi-process
    coordinator_address: str = _f("", "host:port of process 0 (else auto-detect).",
                                  "multi-process")
    num_processes: int = _f(0, "Number of processes (0: auto-detect).", "multi-process")
    process_id: int = _f(-1, "This process's index (-1: auto-detect).", "multi-process")
    init_timeout_s: int = _f(300, "Seconds to wait for all processes to join.", "multi-process")
    # -- BCD and epochs
    cycle: str = _f("complete", f"BCD cycle: one of {CYCLES}.", "BCD and epochs")
    epochs_param: int = _f(12, "Epochs of each parametric phase.", "BCD and epochs")
    epochs_nonparam: int = _f(12, "Epochs of each non-parametric phase.", "BCD and epochs")
    epochs_complete: int = _f(12, "Epochs of each complete phase.", "BCD and epochs")
    first_run: bool = _f(True, "Zero the non-parametric mixing during the first parametric "
                         "phase.", "BCD and epochs")
    epochs: int = _f(20, "Epochs for models without BCD blocks (e.g. mlp).", "BCD and epochs")
    # -- optimizer
    optimizer: str = _f("adam", f"One of {OPTIMIZERS}.", "optimizer")
    learning_rate: float = _f(1e-3, "Learning rate of models without BCD blocks.", "optimizer")
    lr_param: float = _f(1e-2, "Learning rate of the parametric block.", "optimizer")
    lr_nonparam: float = _f(3e-3, "Learning rate of the non-parametric block.", "optimizer")
    schedule: str = _f("constant", f"Learning-rate schedule: one of {SCHEDULES}; each block's "
                       "schedule spans its own updates over the run.", "optimizer")
    warmup_steps: int = _f(0, "Linear warm-up steps.", "optimizer")
    scheduler_T0: int = _f(50, "cosine_warm_restarts: first period in steps (then x2).",
                           "optimizer")
    weight_decay: float = _f(0.0, "Weight decay (decoupled for adamw).", "optimizer")
    grad_clip_norm: float = _f(0.0, "Clip gradients to this global norm (0: off).", "optimizer")
    l2_param: float = _f(1e-9, "PSF: L2 penalty on the OPD maps (the PSF data term is ~1e-5 "
                         "per pixel: keep this small).", "optimizer")
    l1_rate: float = _f(0.0, "PSF: Lp (p=1.1) penalty on alpha_mat, halved every 10 epochs of "
                        "each phase (as WaveDiff).", "optimizer")
    dropout: float = _f(0.0, "mlp: dropout rate after each hidden layer (0: none).",
                        "optimizer")
    sweep: str = _f("", "FIELD:v1,v2,...: ensemble member i trains with the i-th value of "
                    f"FIELD, one of {', '.join(SWEEP_FIELDS)} (as the model uses them); "
                    "the number of values is the ensemble size.", "optimizer")
    # -- checkpointing
    checkpoint_every: int = _f(100, "Save a checkpoint every N steps (0: only at the end).",
                               "checkpointing")
    max_to_keep: int = _f(3, "Checkpoints to keep.", "checkpointing")
    async_checkpoint: bool = _f(True, "Write checkpoints in the background.", "checkpointing")
    restart_from_scratch: bool = _f(False, "Ignore (and replace) existing checkpoints.",
                                    "checkpointing")
    allow_changed_inputs: bool = _f(False, "Resume even if the data or settings differ from "
                                    "those the checkpoints were trained on.", "checkpointing")
    # -- reliability
    skip_nonfinite: bool = _f(True, "Skip updates whose loss or gradients are not finite.",
                              "reliability")
    explosion_factor: float = _f(0.0, "Roll back when loss > factor x its running mean "
                                 "(0: off).", "reliability")
    max_retries: int = _f(3, "Loss-explosion rollbacks before giving up.", "reliability")
    lr_reduction: float = _f(0.5, "Learning-rate factor applied on each rollback.",
                             "reliability")
    watchdog_s: float = _f(0.0, "Abort (thread dump, exit 3) if a step/fetch/save stalls this "
                           "many seconds (0: off). With data on the devices a step is a "
                           "dispatch of up to --log_every steps (at most 128): allow for it.",
                           "reliability")
    # -- output
    log_every: int = _f(25, "Log metrics every N steps.", "output")
    progress: str = _f("auto", f"Progress display: one of {PROGRESS} (auto: bar on a "
                       "terminal).", "output")
    tensorboard: bool = _f(False, "Also write TensorBoard event files to <workdir>/tensorboard "
                           "(needs the [tensorboard] extra).", "output")
    mlflow_uri: str = _f("", "Also track the run in MLflow at this tracking URI, e.g. "
                         "sqlite:///mlruns.db (needs the [mlflow] extra).", "output")
    profile_steps: str = _f("", "START:END: capture a jax.profiler trace of those steps into "
                            "<workdir>/tensorboard/plugins/profile.", "output")

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Fields that do not change the training result (may differ when resuming a workdir).
    RUNTIME_FIELDS = (
        "workdir", "host_devices", "coordinator_address", "num_processes", "process_id",
        "init_timeout_s",
        "max_steps", "restart_from_scratch", "force", "allow_changed_inputs", "log_every",
        "progress", "watchdog_s",
        "async_checkpoint", "tensorboard", "mesh", "sharding", "step_impl", "checkpoint_every",
        "device_data",
        "max_to_keep", "mlflow_uri", "profile_steps",
    )


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"--{name}={value!r} is not valid; choose one of {', '.join(options)}.")


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ValueError(f"--{name}={value} must be >= {low}.")


_INT32 = 2**31 - 1


def _finite(cfg: TrainConfig) -> None:
    """NaN or an infinity turns a number setting silently off or poisons every update."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"--{f.name}={v} is not a finite number; give a number (see "
                             f"--helpfull for its range).")
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > _INT32:
            raise ValueError(f"--{f.name}={v} is out of range; it must be at most {_INT32}.")


def validate(cfg: TrainConfig) -> None:
    """Static checks of ``cfg``; raises `ValueError` naming the flag, its value and the fix."""
    _finite(cfg)
    _choice("model", cfg.model, MODELS)
    _choice("cycle", cfg.cycle, CYCLES)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("step_impl", cfg.step_impl, STEP_IMPLS)
    _choice("device_data", cfg.device_data, DEVICE_DATA)
    _choice("compute_dtype", cfg.compute_dtype, COMPUTE_DTYPES)
    _choice("sharding", cfg.sharding, SHARDINGS)
    _choice("progress", cfg.progress, PROGRESS)
    if not cfg.workdir or not cfg.workdir.strip():
        raise ValueError("--workdir is empty; give a folder for this run, e.g. runs/my_run.")
    if "\x00" in cfg.workdir:
        raise ValueError("--workdir contains a NUL byte; use a plain folder path.")
    if not re.fullmatch(r"\s*(\w+\s*:\s*-?\d+\s*)(,\s*\w+\s*:\s*-?\d+\s*)*", cfg.mesh):
        raise ValueError(
            f"--mesh={cfg.mesh!r} is not of the form axis:size,...; e.g. data:-1,fsdp:2,tensor:1."
        )
    for name in ("n_train", "n_val", "n_test", "batch_size", "grad_accum", "epochs", "log_every",
                 "max_to_keep"):
        _at_least(name, getattr(cfg, name), 1)
    for name in ("epochs_param", "epochs_nonparam", "epochs_complete", "max_steps",
                 "checkpoint_every", "warmup_steps", "host_devices", "num_processes",
                 "max_retries", "seed"):
        _at_least(name, getattr(cfg, name), 0)
    _check_host_devices(cfg.host_devices)
    _at_least("scheduler_T0", cfg.scheduler_T0, 1)
    _at_least("init_timeout_s", cfg.init_timeout_s, 1)
    for name in ("learning_rate", "lr_param", "lr_nonparam"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name}={getattr(cfg, name)} must be > 0.")
    for name in ("weight_decay", "grad_clip_norm", "l2_param", "l1_rate", "explosion_factor",
                 "watchdog_s"):
        _at_least(name, getattr(cfg, name), 0.0)
    _at_least("init_seed", cfg.init_seed, -1)
    _at_least("ensemble", cfg.ensemble, 0)
    if cfg.sweep:
        parse_sweep(cfg)
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"--dropout={cfg.dropout} must be in [0, 1).")
    if not 0.0 < cfg.lr_reduction <= 1.0:
        raise ValueError(f"--lr_reduction={cfg.lr_reduction} must be in (0, 1].")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"--val_fraction={cfg.val_fraction} must be in (0, 1).")
    if 0 < cfg.explosion_factor <= 1.0:
        raise ValueError(
            f"--explosion_factor={cfg.explosion_factor} must be > 1 (or 0 to turn it off)."
        )
    if cfg.profile_steps and not re.fullmatch(r"\d+:\d+", cfg.profile_steps):
        raise ValueError(f"--profile_steps={cfg.profile_steps!r} is not START:END; e.g. 10:15.")
    if cfg.profile_steps and not 0 < profile_range(cfg)[0] < profile_range(cfg)[1]:
        raise ValueError(f"--profile_steps={cfg.profile_steps!r}: need 0 < START < END.")
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(
            f"--batch_size={cfg.batch_size} is not divisible by --grad_accum={cfg.grad_accum}."
        )
    multi = (cfg.coordinator_address != "", cfg.num_processes > 0, cfg.process_id >= 0)
    if any(multi) and not all(multi):
        raise ValueError(
            "--coordinator_address, --num_processes and --process_id must be given together "
            "(or none of them, to auto-detect SLURM/TPU or run one process)."
        )
    if cfg.num_processes and not 0 <= cfg.process_id < cfg.num_processes:
        raise ValueError(
            f"--process_id={cfg.process_id} must be in [0, --num_processes={cfg.num_processes})."
        )


def parse_sweep(cfg: TrainConfig) -> tuple[str, tuple[float, ...]]:
    """``--sweep=FIELD:v1,v2,...`` as ``(FIELD, values)``.

    Raises:
        ValueError: malformed, an unknown field or one the model does not use, a value out of
            the field's range, or a number of values other than ``--ensemble``.
    """
    field, sep, text = cfg.sweep.partition(":")
    field, usable = field.strip(), tuple(SWEEP_TARGETS[cfg.model])
    if not sep or not text.strip():
        raise ValueError(f"--sweep={cfg.sweep!r} is not FIELD:v1,v2,...; e.g. "
                         f"--sweep={usable[0]}:1e-3,3e-3,1e-2.")
    if field not in SWEEP_FIELDS:
        raise ValueError(f"--sweep={cfg.sweep}: unknown sweep field {field!r}; sweep one of "
                         f"{', '.join(usable)} (--model={cfg.model}).")
    if field not in usable:
        raise ValueError(f"--sweep={cfg.sweep}: --model={cfg.model} does not use --{field}; "
                         f"sweep one of {', '.join(usable)}.")
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--sweep={cfg.sweep}: the values must be numbers separated by commas, "
                         f"e.g. --sweep={field}:1e-3,3e-3.") from None
    low_ok = (lambda v: v >= 0) if field == "weight_decay" else (lambda v: v > 0)
    bad = [v for v in values if not (math.isfinite(v) and low_ok(v))]
    if bad:
        raise ValueError(f"--sweep={cfg.sweep}: {bad[0]} is not a valid --{field}; it must be "
                         f"a finite number {'>= 0' if field == 'weight_decay' else '> 0'}.")
    if cfg.ensemble and len(values) != cfg.ensemble:
        raise ValueError(f"--sweep={cfg.sweep} has {len(values)} values but --ensemble="
                         f"{cfg.ensemble}; give one value per member, or --ensemble="
                         f"{len(values)}.")
    return field, values


def ensemble_size(cfg: TrainConfig) -> int:
    """K: ``--ensemble``, else the number of ``--sweep`` values, else 1."""
    return cfg.ensemble or (len(parse_sweep(cfg)[1]) if cfg.sweep else 1)


def is_ensemble(cfg: TrainConfig) -> bool:
    """Whether the run trains an ensemble (``--ensemble`` > 1 or a ``--sweep``)."""
    return cfg.ensemble > 1 or bool(cfg.sweep)


def init_seed(cfg: TrainConfig) -> int:
    """The model's initialisation seed (member 0's in an ensemble)."""
    return cfg.seed if cfg.init_seed < 0 else cfg.init_seed


def profile_range(cfg: TrainConfig) -> tuple[int, int]:
    """``--profile_steps=START:END`` as two ints (``(0, 0)``: no profile)."""
    if not cfg.profile_steps:
        return 0, 0
    start, end = cfg.profile_steps.split(":")
    return int(start), int(end)


def max_host_devices() -> int:
    """The most CPU devices one process may simulate here: 8 per core, at least 64 (each one
    is a thread pool and buffers; tens of thousands exhaust memory before jax notices)."""
    return max(64, 8 * (os.cpu_count() or 1))


def _check_host_devices(n: int) -> None:
    if n > max_host_devices():
        raise ValueError(f"--host_devices={n} is more than this machine can simulate (at most "
                         f"{max_host_devices()}: 8 per CPU core); use fewer, or real devices.")


def config_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig)]


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a config from a dict (e.g. config.json), rejecting unknown keys by name."""
    known = {f.name for f in config_fields()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; valid fields: {sorted(known)}.")
    types = {f.name: f.type if isinstance(f.type, str) else f.type.__name__
             for f in config_fields()}
    return TrainConfig(**{k: _typed(k, v, types[k]) for k, v in values.items()})


def _typed(name: str, value: Any, kind: str) -> Any:
    """``value`` as field ``name``'s type (``"int"``, ``"float"``, ``"bool"`` or ``"str"``).

    Converted: an int to a float, a whole float (``64.0``) to an int, a number written as a
    string (``"1e-3"``, as YAML 1.1 reads it) to a float. Nothing else: ``"no"`` is not a bool.
    """
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str)}.get(kind, True)
    if not ok:
        example = {"bool": "true or false", "int": "e.g. 12", "float": "e.g. 0.001",
                   "str": 'e.g. "text"'}[kind]
        article = "an" if kind == "int" else "a"
        hint = " (in YAML, quote words such as 'off' or 'no')" \
            if kind == "str" and isinstance(value, bool) else ""
        raise ValueError(f"config field {name}={value!r} must be {article} {kind}, {example}, "
                         f"not {type(value).__name__}{hint}.")
    return float(value) if kind == "float" else value


def result_fields(cfg: TrainConfig) -> dict[str, Any]:
    """The fields that determine the training result (compared when reusing a workdir)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in TrainConfig.RUNTIME_FIELDS}
