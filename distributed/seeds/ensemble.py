"""`Trainer`'s ensembles: ``TrainingConfig(ensemble=K, sweep={...})`` -> the engine's
`Ensemble`, and the model forms it accepts (a model, or ``key -> model``)."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import optax

from ..core.ensemble import Ensemble
from .training_config import TrainingConfig


def is_factory(model: Any) -> bool:
    """``model`` is a function ``key -> model`` (Equinox modules are callable too)."""
    return callable(model) and not isinstance(model, eqx.Module)


def members(config: TrainingConfig, model: Any, optimizer: optax.GradientTransformation | None
            ) -> Ensemble | None:
    """The members of ``config`` (``None``: one model). Member ``i`` is initialised from
    ``seed + i``, or every member from ``seed`` in a sweep (so only the swept values differ).

    Raises:
        ValueError: an ensemble of a built model (it needs ``key -> model``), or a sweep with a
            custom optimizer (whose settings are constants of the transformation).
    """
    sweep = dict(config.sweep or {})
    if config.ensemble <= 1 and not sweep:
        return None
    if not is_factory(model):
        raise ValueError("TrainingConfig.ensemble / sweep: each member is built from its own "
                         "key; pass the model as a function key -> model, e.g. "
                         "Trainer(lambda key: eqx.nn.MLP(6, 4, 64, 2, key=key), config).")
    if sweep and optimizer is not None:
        raise ValueError("TrainingConfig.sweep needs the config's optimizer (a custom optax "
                         "optimizer keeps its settings as constants); drop optimizer=... or "
                         "the sweep.")
    k = config.ensemble if config.ensemble > 1 else len(next(iter(sweep.values())))
    seeds = (config.seed,) * k if sweep else tuple(config.seed + i for i in range(k))
    return Ensemble(seeds, {"all": sweep} if sweep else {})


def single(model: Any, seed: int) -> Any:
    """One concrete model: ``model`` itself, or ``model(jax.random.key(seed))``."""
    return model(jax.random.key(seed)) if is_factory(model) else model


def task_models(model: Any, ensemble: Ensemble | None, seed: int) -> tuple[Any, Any]:
    """``(the engine Task's model, one concrete model to probe shapes and blocks with)``: for
    an ensemble, ``key -> model`` and the member of ``seed``; else the model of ``seed``."""
    probe = single(model, seed)
    return (model if ensemble is not None else probe), probe


def header(ensemble: Ensemble | None) -> dict[str, Any]:
    """The ``"ensemble"`` record of a model file holding every member (none for one model)."""
    if ensemble is None:
        return {}
    return {"ensemble": {"members": ensemble.size, "init_seeds": list(ensemble.init_seeds)}}
