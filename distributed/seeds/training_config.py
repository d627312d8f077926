"""`TrainingConfig`: what `Trainer` does (seeds 001, 003 and 004 spell some fields differently;
both spellings work)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.optim import OPTIMIZERS, SCHEDULES
from ..core.registry import list_losses
from ..core.step import COMPUTE_DTYPES

_ALIASES = {"num_epochs": "epochs", "validation_frequency": "validate_every",
            "checkpoint_frequency": "checkpoint_every", "patience": "early_stopping_patience"}


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """What `Trainer` does, validated on creation (a `ValueError` names the bad field).

    Epoch-based fields: ``epochs`` (alias ``num_epochs``), ``print_every`` (0: silent),
    ``validate_every`` (alias ``validation_frequency``), ``early_stopping_patience`` (alias
    ``patience``; None/0: off; counted in validations), ``checkpoint_every`` (alias
    ``checkpoint_frequency``: Orbax checkpoints under ``save_dir/run_name/checkpoints``; 0: off),
    ``scheduler_T0`` (first warm-restart period; setting it alone selects
    ``cosine_warm_restarts``). ``warmup_steps`` is in steps.

    Loss: ``loss`` names a registered loss (`distributed.losses.list_losses`), built with
    ``loss_params`` (plus ``huber_delta`` for "huber").
    Clipping: ``gradient_clip`` clips each gradient element to [-c, c] (seed 003),
    ``grad_clip_norm`` the global norm. Mixed precision: ``compute_dtype`` ("bfloat16"), or
    ``use_amp=True`` which means bfloat16 on GPU/TPU and float32 on CPU.
    Recovery: a loss above ``loss_explosion_threshold`` or above ``explosion_factor`` x its
    running mean rolls back to the last good state with the LR times ``lr_reduction``, at most
    ``max_retries`` times (both off by default; non-finite updates are always skipped).
    ``save_best`` writes ``save_dir/run_name/best.eqx`` (``save_dir`` default
    ``~/.cache/distributed/saved_models``); ``run_name`` must stay inside ``save_dir``.
    Ensembles: ``ensemble=K`` trains K members at once (member ``i`` initialised from
    ``seed + i``; the model given as ``key -> model``), all on the same batches; ``sweep``
    (``{"learning_rate" | "weight_decay": K values}``) gives member ``i`` its own values (then
    every member starts from ``seed``, and K is the number of values).
    Input: ``device_data`` ("auto", "on", "off") keeps the training arrays on the devices and
    runs many steps per dispatch (the same batches and results; auto: when they fit).
    """

    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    loss: str = "mse"
    loss_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    huber_delta: float | None = None
    optimizer: str = "adam"
    scheduler: str | None = None
    scheduler_T0: int | None = None
    decay_rate: float = 0.96
    warmup_steps: int = 0
    weight_decay: float = 0.0
    gradient_clip: float | None = None
    grad_clip_norm: float | None = None
    use_amp: bool = False
    compute_dtype: str | None = None
    save_best: bool = False
    save_dir: str | None = None
    run_name: str = "model"
    print_every: int = 10
    validate_every: int = 1
    early_stopping: bool = True
    early_stopping_patience: int | None = None
    checkpoint_every: int = 0
    max_retries: int = 3
    loss_explosion_threshold: float | None = None
    explosion_factor: float = 0.0
    lr_reduction: float = 0.5
    seed: int = 0
    shuffle: bool = True
    device_data: str = "auto"
    output_names: Sequence[str] | None = None
    ensemble: int = 1
    sweep: Mapping[str, Sequence[float]] | None = None

    # seed 004's names for the same settings
    num_epochs = property(lambda self: self.epochs)
    validation_frequency = property(lambda self: self.validate_every)
    checkpoint_frequency = property(lambda self: self.checkpoint_every)
    patience = property(lambda self: self.early_stopping_patience)

    def __post_init__(self):
        if self.scheduler is None:
            object.__setattr__(self, "scheduler", "cosine_warm_restarts" if self.scheduler_T0
                               else "constant")
        object.__setattr__(self, "loss_params", dict(self.loss_params))
        if self.sweep is not None:
            object.__setattr__(self, "sweep", {k: tuple(v) for k, v in dict(self.sweep).items()})
        if self.output_names is not None:
            object.__setattr__(self, "output_names", tuple(str(n) for n in self.output_names))
        _validate(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingConfig:
        """Build from a plain dict (seed 003's ``config={...}``), rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)} | set(_ALIASES)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainingConfig: unknown key(s) {unknown}; valid keys: "
                             f"{sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _init_with_aliases(init):
    def __init__(self, *args, **kwargs):
        for alias, name in _ALIASES.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                if name in kwargs and kwargs[name] != value:
                    raise ValueError(f"TrainingConfig: {alias}={value!r} and {name}="
                                     f"{kwargs[name]!r} disagree; give only one.")
                kwargs[name] = value
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    return __init__


TrainingConfig.__init__ = _init_with_aliases(TrainingConfig.__init__)


def _int(cfg, name, low, allow_none=False):
    v = getattr(cfg, name)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ValueError(f"TrainingConfig.{name}={v!r} must be an integer >= {low}"
                         f"{' (or None)' if allow_none else ''}.")


def _num(cfg, name, low, strict=False, allow_none=False):
    v = getattr(cfg, name)
    if v is None and allow_none:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
        v > low if strict else v >= low)
    if not ok:
        raise ValueError(f"TrainingConfig.{name}={v!r} must be a finite number "
                         f"{'>' if strict else '>='} {low}{' (or None)' if allow_none else ''}.")


def _check_sweep(cfg: TrainingConfig) -> None:
    for name, values in (cfg.sweep or {}).items():
        if name not in ("learning_rate", "weight_decay"):
            raise ValueError(f"TrainingConfig.sweep: unknown field {name!r}; sweep "
                             f"learning_rate or weight_decay.")
        k = cfg.ensemble if cfg.ensemble > 1 else len(next(iter(cfg.sweep.values())))
        if len(values) != k or not values:
            raise ValueError(f"TrainingConfig.sweep[{name!r}] has {len(values)} values for "
                             f"{k} members (ensemble={cfg.ensemble}); give one per member.")
        low = 0 if name == "weight_decay" else 1e-300
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= low
                   for v in values):
            raise ValueError(f"TrainingConfig.sweep[{name!r}]={values} must be finite numbers "
                             f"{'>= 0' if name == 'weight_decay' else '> 0'}.")


def _validate(cfg: TrainingConfig) -> None:
    _int(cfg, "epochs", 1)
    _int(cfg, "batch_size", 1)
    for name in ("print_every", "warmup_steps", "checkpoint_every", "max_retries", "seed"):
        _int(cfg, name, 0)
    _int(cfg, "validate_every", 1)
    _int(cfg, "ensemble", 1)
    _check_sweep(cfg)
    if cfg.device_data not in ("auto", "on", "off"):
        raise ValueError(f"TrainingConfig.device_data={cfg.device_data!r} is not valid; choose "
                         f"one of ('auto', 'on', 'off').")
    _int(cfg, "early_stopping_patience", 0, allow_none=True)
    _int(cfg, "scheduler_T0", 1, allow_none=True)
    _num(cfg, "learning_rate", 0, strict=True)
    for name in ("weight_decay", "explosion_factor"):
        _num(cfg, name, 0)
    for name in ("gradient_clip", "grad_clip_norm", "loss_explosion_threshold", "huber_delta"):
        _num(cfg, name, 0, strict=True, allow_none=True)
    if not (isinstance(cfg.decay_rate, (int, float)) and 0 < cfg.decay_rate <= 1):
        raise ValueError(f"TrainingConfig.decay_rate={cfg.decay_rate!r} must be in (0, 1].")
    if not (isinstance(cfg.lr_reduction, (int, float)) and 0 < cfg.lr_reduction <= 1):
        raise ValueError(f"TrainingConfig.lr_reduction={cfg.lr_reduction!r} must be in (0, 1].")
    if 0 < cfg.explosion_factor <= 1:
        raise ValueError(f"TrainingConfig.explosion_factor={cfg.explosion_factor} must be > 1 "
                         f"(or 0: off).")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"TrainingConfig.optimizer={cfg.optimizer!r}; choose one of "
                         f"{', '.join(OPTIMIZERS)}.")
    if cfg.scheduler not in SCHEDULES:
        raise ValueError(f"TrainingConfig.scheduler={cfg.scheduler!r}; choose one of "
                         f"{', '.join(SCHEDULES)}.")
    if cfg.scheduler == "cosine_warm_restarts" and not cfg.scheduler_T0:
        raise ValueError("TrainingConfig.scheduler='cosine_warm_restarts' needs scheduler_T0 "
                         "(the first period, in epochs).")
    if cfg.compute_dtype not in (None, *COMPUTE_DTYPES):
        raise ValueError(f"TrainingConfig.compute_dtype={cfg.compute_dtype!r}; use None or one "
                         f"of {', '.join(COMPUTE_DTYPES)}.")

    if not isinstance(cfg.loss, str) or cfg.loss not in list_losses():
        raise ValueError(f"TrainingConfig.loss={cfg.loss!r} is not a registered loss; choose one "
                         f"of {list_losses()} or register yours with register_loss.")
    if cfg.huber_delta is not None and cfg.loss != "huber":
        raise ValueError(f"TrainingConfig.huber_delta is set but loss={cfg.loss!r}; use "
                         f"loss='huber' or drop huber_delta.")
    name = cfg.run_name
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise ValueError(f"TrainingConfig.run_name={name!r} must be a non-empty name.")
    parts = Path(name).parts
    if os.path.isabs(name) or name.startswith(("/", "\\", "~")) or ".." in parts or \
            ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"TrainingConfig.run_name={name!r} must be a relative name inside "
                         f"save_dir (no absolute path, no '..').")


