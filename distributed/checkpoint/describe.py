"""What a model file's header says about the model, and rebuilding a model from it.

The header keeps desisky's layout: ``"arch"`` holds exactly the constructor's keyword
arguments (JSON values), so ``constructor(**arch)`` rebuilds the model, as desisky's
``load_model(kind, path=...)`` does. Everything else sits beside it: ``"model"`` names the
class (``"equinox.nn.MLP"``, or a model of `distributed.models`), and for an ``eqx.nn.MLP``
``"activation"`` / ``"final_activation"`` name its functions (they are not JSON values). A
header without ``"model"`` whose ``arch`` has an MLP's arguments (desisky's own files) is an
``eqx.nn.MLP`` with its default activations.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .errors import CheckpointError

EQX_MLP = "equinox.nn.MLP"
_MLP_REQUIRED = ("in_size", "out_size", "width_size", "depth")
_MLP_OPTIONAL = ("use_bias", "use_final_bias", "dtype")
_MLP_DEFAULTS = {k: p.default for k, p in
                 inspect.signature(eqx.nn.MLP.__init__).parameters.items()}


def _named_functions() -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    for module in (jnp, jax.nn):  # jax.nn's names win (jax.nn.relu over anything else)
        for name in dir(module):
            fn = getattr(module, name)
            if not name.startswith("_") and callable(fn) and not isinstance(fn, type):
                out[name] = fn
    out["identity"] = _MLP_DEFAULTS["final_activation"]
    return out


def _name_of(fn: Callable) -> str | None:
    for name, known in _named_functions().items():
        if fn is known:
            return name
    return None


def describe(model: Any) -> dict[str, Any]:
    """The header fields that describe ``model`` (``{"model", "arch", ...}``), or ``{}`` when
    it is not a model this format can rebuild (then load it with a template)."""
    from ..models import model_name

    name = model_name(model)
    if name is not None:
        return {"model": name, "arch": model.arch()}
    if not isinstance(model, eqx.nn.MLP):
        return {}
    arch = {k: getattr(model, k) for k in _MLP_REQUIRED}
    for k in ("use_bias", "use_final_bias"):
        if getattr(model, k) != _MLP_DEFAULTS[k]:
            arch[k] = getattr(model, k)
    dtype = model.layers[0].weight.dtype
    if dtype != jnp.float32:
        arch["dtype"] = str(dtype)
    out = {"model": EQX_MLP, "arch": arch}
    for k in ("activation", "final_activation"):
        out[k] = _name_of(getattr(model, k))  # None: not rebuildable, said at load time
    return out


def rebuild(header: dict, *, key: jax.Array, constructor: Callable | None = None,
            where: str = "the file") -> Any:
    """A model of the structure ``header`` describes (its parameters to be loaded).

    Raises:
        CheckpointError: the header does not say how to rebuild the model (naming what is
            missing and what to do instead).
    """
    arch = header.get("arch")
    if arch is None and header and "schema" not in header:
        arch = header  # desisky's legacy flat header: the arch itself
    if not isinstance(arch, dict):
        raise CheckpointError(f"{where} has no 'arch' (constructor arguments), so the model "
                              f"cannot be rebuilt; use load_checkpoint(template, path).")
    if constructor is not None:
        try:
            return constructor(**arch)
        except TypeError:
            return constructor(**arch, key=key)
    name = header.get("model") or arch.get("name")
    if name is None and set(_MLP_REQUIRED) <= set(arch) <= {*_MLP_REQUIRED, *_MLP_OPTIONAL}:
        name = EQX_MLP  # desisky's files: an MLP with eqx.nn.MLP's default activations
    if name in (EQX_MLP, "eqx.nn.MLP"):
        return _eqx_mlp(header, arch, key, where)
    from ..models import MODEL_NAMES, build_model

    if name not in MODEL_NAMES:
        raise CheckpointError(f"{where} describes a model {name!r} this package cannot "
                              f"rebuild (it knows {[EQX_MLP, *MODEL_NAMES]}); pass "
                              f"constructor=..., or use load_checkpoint(template, path).")
    return build_model(arch, key=key, name=name)


def _eqx_mlp(header: dict, arch: dict, key: jax.Array, where: str) -> eqx.nn.MLP:
    known = _named_functions()
    kwargs = dict(arch)
    kwargs.pop("name", None)
    header = {**{k: kwargs.pop(k) for k in ("activation", "final_activation") if k in kwargs},
              **header}  # older files kept the names inside arch
    fns = {}
    for k in ("activation", "final_activation"):
        if k not in header:  # desisky's files, and arch-only headers: the defaults
            fns[k] = _MLP_DEFAULTS[k]
            continue
        name = header[k]
        if name not in known:
            raise CheckpointError(
                f"{where}: the MLP's {k} is {name!r}, not a function this package can name "
                f"(jax.nn / jax.numpy functions, or identity); rebuild the model yourself and "
                f"use load_checkpoint(template, path).")
        fns[k] = known[name]
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    try:
        return eqx.nn.MLP(**kwargs, **fns, key=key)
    except TypeError as e:
        raise CheckpointError(f"{where}: its arch {arch} does not fit eqx.nn.MLP ({e}).") from e
