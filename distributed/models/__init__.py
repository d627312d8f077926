"""Models shipped with the library: the PSF field model (default), an MLP, a transformer LM.

Every model has an `arch()` method returning a JSON-able `{"name": ..., **constructor kwargs}`
dict; `build_model(arch, key=key)` rebuilds a model of the same structure from it.
"""

from typing import Any

import equinox as eqx
from jaxtyping import PRNGKeyArray

from .mlp import ACTIVATIONS as ACTIVATIONS
from .mlp import MLP as MLP
from .psf import PSFFieldModel as PSFFieldModel
from .psf import polychromatic_psf as polychromatic_psf
from .psf import zernike_basis as zernike_basis
from .psf_data import STAR_FIELD_DEFAULTS as STAR_FIELD_DEFAULTS
from .psf_data import evaluate_psf as evaluate_psf
from .psf_data import make_star_field as make_star_field
from .psf_data import psf_batch_tuple as psf_batch_tuple
from .transformer import TransformerLM as TransformerLM
from .transformer import flops_per_token as flops_per_token
from .transformer import lm_loss as lm_loss


def _eqx_mlp(*, key: PRNGKeyArray, activation: str = "relu", **kwargs: Any) -> eqx.nn.MLP:
    """`eqx.nn.MLP` (as seed 001 uses it), its activation named by a `jax.nn` function."""
    import jax

    fn = getattr(jax.nn, activation, None)
    if not callable(fn):
        raise ValueError(f"eqx.nn.MLP activation {activation!r} is not a jax.nn function; "
                         f"rebuild the model yourself and use load_checkpoint(template, path).")
    return eqx.nn.MLP(activation=fn, key=key, **kwargs)


_REGISTRY = {"psf": PSFFieldModel, "mlp": MLP, "transformer": TransformerLM}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
_REGISTRY["eqx.nn.MLP"] = _eqx_mlp  # also rebuildable (seed 001 trains one), not a model of ours
"""Names accepted by `build_model` (the "name" entry of an `arch()` dict)."""


def build_model(arch: dict[str, Any], *, key: PRNGKeyArray) -> eqx.Module:
    """Build a model from an architecture dict `{"name": ..., **constructor kwargs}`.

    Args:
        arch: e.g. `model.arch()`, or `{"name": "psf"}` for the default PSF model.
        key: PRNG key for the initial parameters.

    Returns:
        The new model.

    Raises:
        ValueError: if the name is missing or unknown, or the kwargs do not fit the constructor.
    """
    if not isinstance(arch, dict) or "name" not in arch:
        raise ValueError(f"arch must be a dict with a 'name' entry (one of {list(MODEL_NAMES)}), "
                         f"got {arch!r}.")
    kwargs = dict(arch)
    name = kwargs.pop("name")
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model name {name!r}; valid names are {list(MODEL_NAMES)}.")
    try:
        return _REGISTRY[name](key=key, **kwargs)
    except TypeError as e:  # unexpected or missing keyword
        raise ValueError(f"Bad arguments for model {name!r}: {e}. See the docstring of "
                         f"{getattr(_REGISTRY[name], '__name__', name)} for its constructor "
                         f"arguments.") from e
