"""Single-file model checkpoints: one JSON header line, then Equinox's binary leaves.

The file format (the seeds' "JSON header + Equinox binary format"):

    {"schema": 1, "arch": {...}, "training": {...}}\\n
    <the bytes eqx.tree_serialise_leaves(f, model) writes>

so `read_metadata` needs only `json`, and what follows the first newline is read by
`eqx.tree_deserialise_leaves` (typed PRNG keys are stored as their key data). Files are written
atomically: a half-written file never appears under the final name. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from .describe import describe, rebuild
from .errors import CheckpointError, CheckpointMismatch
from .leaves import is_key, jsonable, key_impl

SCHEMA = 1


def make_metadata(
    *,
    step: int,
    epoch: int,
    train_loss: float | None,
    val_loss: float | None,
    per_output_rmse: dict | None = None,
    config: Any = None,
    extra: dict | None = None,
    arch: dict | None = None,
) -> dict:
    """The checkpoint metadata record, schema 1 (plain JSON types only).

    Args:
        step, epoch: training progress.
        train_loss, val_loss: the latest losses, or `None`.
        per_output_rmse: `{output name: RMSE}`, or `None`.
        config: the training configuration, a dict or a dataclass.
        extra: anything else, stored under `"extra"`.
        arch: the model's constructor keyword arguments; by default `save_checkpoint` writes
            what `describe(model)` says.

    Returns:
        `{"schema": 1, "training": {"date" (ISO 8601, UTC), "epoch", "step", "train_loss",
        "val_loss", "per_output_rmse", "config"}}`, plus `"arch"` and `"extra"` if given.
    """
    record = {
        "schema": SCHEMA,
        "training": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "epoch": int(epoch),
            "step": int(step),
            "train_loss": None if train_loss is None else float(train_loss),
            "val_loss": None if val_loss is None else float(val_loss),
            "per_output_rmse": (
                None
                if per_output_rmse is None
                else {str(k): float(v) for k, v in per_output_rmse.items()}
            ),
            "config": jsonable(config if config is not None else {}),
        },
    }
    if extra is not None:
        record["extra"] = jsonable(dict(extra))
    if arch is not None:
        record["arch"] = jsonable(dict(arch))
    return record


# ------------------------------------------------------------------------------- leaf codecs


def _gather(x: Any) -> Any:
    """`x` as one host-readable value: typed keys as key data, global arrays gathered."""
    if isinstance(x, jax.Array):
        if is_key(x):
            x = jax.random.key_data(x)
        if not x.is_fully_addressable:  # multi-process: every process joins the gather
            x = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return x


def _load_npy(f) -> np.ndarray:
    out = np.load(f, allow_pickle=False)
    if out.dtype == np.dtype("V2"):  # how jnp.save writes bfloat16
        out = out.view(jnp.bfloat16)
    return out


def _read_leaf(f, x: Any, where: str) -> Any:
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)):
        want = jax.eval_shape(jax.random.key_data, x) if is_key(x) else x
        data = _load_npy(f)
        if data.shape != tuple(want.shape) or data.dtype != np.dtype(want.dtype):
            raise CheckpointMismatch(
                f"{where}: the file has shape {data.shape} {data.dtype}, the template has "
                f"shape {tuple(want.shape)} {np.dtype(want.dtype)}."
            )
        if isinstance(x, np.ndarray):
            return data
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            out = jnp.asarray(data)
        else:
            out = jax.make_array_from_callback(data.shape, sharding, lambda index: data[index])
        return jax.random.wrap_key_data(out, impl=key_impl(x)) if is_key(x) else out
    return eqx.default_deserialise_filter_spec(f, x)  # Python scalars; others kept as they are


# ----------------------------------------------------------------------------------- the API


def save_checkpoint(model: Any, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write `model` to `path`: a JSON header line, then Equinox's serialised leaves.

    The write is atomic (a temporary file, then `os.replace`). In multi-process runs call it on
    every process: all of them gather the sharded arrays, process 0 writes.

    Args:
        model: any pytree (e.g. an `eqx.Module`); its arrays may be sharded.
        path: the file to write; its parent directory is created.
        metadata: a JSON-serialisable dict (e.g. from `make_metadata`). ``"schema"`` defaults to
            1; ``"arch"`` (the constructor's keyword arguments) and ``"model"`` (the class)
            default to what `describe` says of the model (an ``eqx.nn.MLP``, or a model of
            `distributed.models`), so that `load_model` and desisky's loader rebuild it.
    """
    path = pathlib.Path(path)
    header = {"schema": SCHEMA, **describe(model), **dict(metadata or {})}
    try:
        line = json.dumps(jsonable(header)).encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"`metadata` must be JSON-serialisable: {e}") from None
    leaves = jax.tree_util.tree_leaves(model)  # the order of eqx.tree_serialise_leaves
    if jax.process_index() != 0:
        for leaf in leaves:
            if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                _gather(leaf)
        multihost_utils.sync_global_devices(f"save_checkpoint:{path}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(line + b"\n")
            for leaf in leaves:
                eqx.default_serialise_filter_spec(f, _gather(leaf))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0o600 would make the checkpoint private
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_checkpoint:{path}")


@contextlib.contextmanager
def _open(path: pathlib.Path):
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"No checkpoint file at {path}.") from None
    with f:
        yield f


def _read_header(f, path: pathlib.Path) -> dict:
    line = f.readline()
    try:
        header = json.loads(line)
    except ValueError as e:  # also UnicodeDecodeError
        raise CheckpointError(
            f"{path} is not a checkpoint: its first line is not a JSON header ({e})."
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a checkpoint: its JSON header is not an object.")
    return header


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON header of a file written by `save_checkpoint`."""
    path = pathlib.Path(path)
    with _open(path) as f:
        return _read_header(f, path)


def load_checkpoint(template: Any, path: str | os.PathLike) -> Any:
    """Load a model written by `save_checkpoint` into the structure of `template`.

    Args:
        template: a pytree like the saved one. Array leaves may be arrays or
            `jax.ShapeDtypeStruct`s (e.g. from `eqx.filter_eval_shape`); loaded arrays take
            their sharding, when they have one. Non-array leaves come from the template.
        path: the file.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is not a checkpoint, or is corrupt or truncated.
        ValueError: the file does not fit the template (names the leaf and both shapes).
    """
    path = pathlib.Path(path)
    with _open(path) as f:
        _read_header(f, path)
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
        loaded = []
        for key_path, leaf in paths_leaves:
            where = f"{path}: leaf {jax.tree_util.keystr(key_path) or '<root>'}"
            try:
                loaded.append(_read_leaf(f, leaf, where))
            except CheckpointMismatch:
                raise
            except EOFError:
                raise CheckpointError(
                    f"{where}: no data left: the file is truncated, or the template has more "
                    "array leaves than the saved model."
                ) from None
            except Exception as e:  # noqa: BLE001 - whatever numpy makes of garbage
                raise CheckpointError(f"{where}: corrupt data ({type(e).__name__}: {e}).") from e
        if f.read(1):
            raise ValueError(
                f"{path} holds more array leaves than the template: the template does not "
                "match the saved model."
            )
    return jax.tree_util.tree_unflatten(treedef, loaded)


def load_model(path: str | os.PathLike, *, constructor: Callable | None = None,
               key: jax.Array | None = None) -> tuple[Any, dict]:
    """Rebuild a model from its file's header, then load its weights (desisky's ``load``).

    Reads this package's files and desisky's: the header's ``"arch"`` is the constructor's
    keyword arguments (see `distributed.checkpoint.describe`).

    Args:
        path: a file written by `save_checkpoint` (or by desisky).
        constructor: ``constructor(**arch)`` builds the model, as desisky's loader does; by
            default the header's ``"model"`` says which (``equinox.nn.MLP`` or a model of
            `distributed.models`; an MLP-shaped ``arch`` without it is an ``eqx.nn.MLP``).
        key: PRNG key for building the model before its weights are loaded; default `key(0)`.

    Returns:
        `(model, metadata)`. A file holding an ensemble (header ``"ensemble": {"members": K,
        ...}``) gives every member at once: each array has a leading axis of size K.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the header does not say how to rebuild the model (e.g. an MLP
            activation that is not a named jax function), or the file is corrupt.
        CheckpointMismatch: the weights do not fit the rebuilt model.
    """
    metadata = read_metadata(path)
    template = rebuild(metadata, key=jax.random.key(0) if key is None else key,
                       constructor=constructor, where=str(path))
    members = (metadata.get("ensemble") or {}).get("members")
    if members:
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct((int(members), *x.shape), x.dtype)
                                if eqx.is_array(x) else x, template)
    return load_checkpoint(template, path), metadata
