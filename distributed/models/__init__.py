"""Models shipped with the library: the PSF field model (default), an MLP, a transformer LM.

Every model has an `arch()` method returning its JSON-able constructor keyword arguments;
`build_model(model.arch(), key=key, name=model_name(model))` rebuilds a model of the same
structure from them.
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

_REGISTRY = {"psf": PSFFieldModel, "mlp": MLP, "transformer": TransformerLM}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
"""Names accepted by `build_model` (what `model_name` returns)."""


def model_name(model: Any) -> str | None:
    """The registry name of one of this package's models (``None`` for other models)."""
    return next((n for n, cls in _REGISTRY.items() if type(model) is cls), None)


def build_model(arch: dict[str, Any], *, key: PRNGKeyArray, name: str | None = None
                ) -> eqx.Module:
    """Build one of this package's models from its constructor arguments.

    Args:
        arch: ``model.arch()`` (the constructor's keyword arguments; an older ``{"name": ...,
            **kwargs}`` form is read too).
        key: PRNG key for the initial parameters.
        name: the model's name (`MODEL_NAMES`; `model_name(model)`).

    Returns:
        The new model.

    Raises:
        ValueError: if the name is missing or unknown, or the kwargs do not fit the constructor.
    """
    if not isinstance(arch, dict):
        raise ValueError(f"arch must be a dict of constructor arguments, got {arch!r}.")
    kwargs = dict(arch)
    name = name or kwargs.pop("name", None)
    kwargs.pop("name", None)
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model name {name!r}; valid names are {list(MODEL_NAMES)}.")
    try:
        return _REGISTRY[name](key=key, **kwargs)
    except TypeError as e:  # unexpected or missing keyword
        raise ValueError(f"Bad arguments for model {name!r}: {e}. See the docstring of "
                         f"{getattr(_REGISTRY[name], '__name__', name)} for its constructor "
                         f"arguments.") from e
