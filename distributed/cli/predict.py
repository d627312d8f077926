"""Predictions of a trained model on new inputs.

    python -m distributed.predict --model=WORKDIR/model.eqx --data=in.npz --out=pred.npz

``--model``: a single-file model (``<workdir>/model.eqx`` of a training run, or any file
written by `distributed.save_checkpoint` for a model it can rebuild), or the workdir itself.
``--data``: an ``.npz`` holding the inputs, by model:

- ``mlp`` (this package's MLP) and ``equinox.nn.MLP``: ``x`` (N, in_size) -> ``pred``
  (N, out_size), in the units of the targets it was trained on;
- ``psf``: ``positions`` (N, 2) in field coordinates and ``seds`` (N, n_lambda) ->
  ``pred`` (N, n_pix, n_pix), PSFs normalised to sum 1.

``--out``: the ``.npz`` to write, holding ``pred`` (float32). For an ensemble's file (a run
with ``--ensemble`` or ``--sweep``) ``pred`` is the mean over the members, ``pred_std`` their
standard deviation per output (ddof 0) and ``pred_members`` each member's, shape (K, N, ...).
The model runs in inference mode
(dropout off), in batches of ``--batch_size`` rows (the last one padded, so one compilation).
The output is written atomically (a temporary file, then a rename): bad input — a missing or
unreadable file, a missing array, a wrong shape, NaN/inf — ends with exit code 2, one
``error:`` line naming the value and the fix, and nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..runtime.exit_codes import USAGE
from .conflicts import check_import_name


class PredictError(Exception):
    """Bad input: reported as one ``error:`` line with exit code 2."""


def _inputs_for(model, kind: str) -> dict[str, tuple]:
    """The arrays ``kind`` needs: ``{name: shape}`` with ``None`` for N (rows)."""
    if kind == "psf":
        return {"positions": (None, 2), "seds": (None, model.n_lambda)}
    if kind == "equinox.nn.MLP" and model.in_size == "scalar":
        return {"x": (None,)}
    return {"x": (None, model.in_size)}


def model_kind(model) -> str:
    """``"mlp"``, ``"psf"`` or ``"equinox.nn.MLP"``.

    Raises:
        PredictError: another kind of model.
    """
    import equinox as eqx

    from ..models import MLP, PSFFieldModel

    if isinstance(model, PSFFieldModel):
        return "psf"
    if isinstance(model, MLP):
        return "mlp"
    if isinstance(model, eqx.nn.MLP):
        return "equinox.nn.MLP"
    raise PredictError(f"predict runs mlp, psf and equinox.nn.MLP models; this file holds a "
                       f"{type(model).__name__}: call the model from Python instead.")


def load(path: str) -> tuple[object, str, int]:
    """``(model, kind, members)`` from a model file or a workdir holding ``model.eqx``
    (``members``: the ensemble's size, 0 for a single model).

    Raises:
        PredictError: no such file, or not a model file this package can rebuild.
    """
    from ..checkpoint import CheckpointError, load_model

    p = Path(path)
    if p.is_dir():
        p = p / "model.eqx"
    if not p.is_file():
        raise PredictError(f"--model={path}: no such file; give the model.eqx a training run "
                           f"wrote (<workdir>/model.eqx) or a file from save_checkpoint.")
    try:
        model, meta = load_model(p)
    except (CheckpointError, OSError, ValueError, TypeError, EOFError) as e:
        first = (str(e).splitlines()[0] if str(e) else type(e).__name__).rstrip(".")
        raise PredictError(f"--model={path} is not a readable model file ({first}); give a "
                           f"file written by a training run or by save_checkpoint.") from None
    return model, model_kind(model), int((meta.get("ensemble") or {}).get("members") or 0)


def read_inputs(path: str, need: dict[str, tuple], kind: str) -> dict[str, np.ndarray]:
    """The arrays of ``need`` from the ``.npz`` at ``path``, as float32, checked.

    Raises:
        PredictError: missing or unreadable file, missing array, wrong shape or dtype, rows
            that differ between arrays, NaN/inf.
    """
    if not Path(path).is_file():
        raise PredictError(f"--data={path}: no such file; give an .npz with "
                           f"{_describe(need)}.")
    savez = f"numpy.savez(path, {', '.join(f'{k}=...' for k in need)})"
    if not zipfile.is_zipfile(path):
        raise PredictError(f"--data={path} is not an .npz file; write one with {savez}.")
    try:
        with np.load(path, allow_pickle=False) as f:
            held = {k: f[k] for k in f.files if k in need}
            names = list(f.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise PredictError(f"--data={path} is not a readable .npz file ({e}); write it with "
                           f"{savez}.") from None
    out, rows = {}, None
    for name, shape in need.items():
        if name not in held:
            raise PredictError(f"--data={path} has no array {name!r} (it holds {names}); the "
                               f"{kind} model needs {_describe(need)}.")
        a = held[name]
        if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape,
                                                                              strict=False)):
            raise PredictError(f"--data={path}: array {name!r} has shape {a.shape}; the {kind} "
                               f"model needs {_describe({name: shape})}.")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise PredictError(f"--data={path}: array {name!r} has dtype {a.dtype}; give "
                               f"numbers (float32).")
        if len(a) == 0:
            raise PredictError(f"--data={path}: array {name!r} has no rows; give at least one "
                               f"input.")
        a = a.astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))
        if bad.size:
            raise PredictError(f"--data={path}: array {name!r} has NaN/inf at row {bad[0]} "
                               f"({bad.size} rows); remove or fix those rows.")
        if rows is not None and len(a) != rows:
            raise PredictError(f"--data={path}: array {name!r} has {len(a)} rows but "
                               f"{next(iter(need))!r} has {rows}; give one row per input.")
        rows = len(a)
        out[name] = a
    return out


def _describe(need: dict[str, tuple]) -> str:
    dims = lambda shape: "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
    return " and ".join(f"{k} of shape {dims(s)}" for k, s in need.items())


def predict(model, kind: str, inputs: dict[str, np.ndarray], batch_size: int = 256,
            members: int = 0) -> np.ndarray:
    """The model's outputs for every row of ``inputs``, float32, in inference mode: ``(N, ...)``,
    or ``(K, N, ...)`` for an ensemble of ``members`` = K (each member's).

    Rows are run ``batch_size`` at a time; the last batch is padded (by repeating its last
    row) so every batch has one shape and the forward pass compiles once.
    """
    import equinox as eqx
    import jax

    model = eqx.nn.inference_mode(model)
    names = list(inputs)
    if kind == "equinox.nn.MLP":  # one example per call: vmapped over the rows
        single = lambda m, *xs: jax.vmap(m)(*xs)  # noqa: E731
    else:  # this package's models take batches
        single = lambda m, *xs: m(*xs)  # noqa: E731
    if members:  # every member (leading axis of each array) on the same rows
        step = eqx.filter_jit(lambda m, *xs: eqx.filter_vmap(lambda mm: single(mm, *xs))(m))
    else:
        step = eqx.filter_jit(single)
    n = len(inputs[names[0]])
    size = min(batch_size, n)
    outs = []
    for start in range(0, n, size):
        chunk = [inputs[k][start:start + size] for k in names]
        pad = size - len(chunk[0])
        chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) if pad else c
                 for c in chunk]
        out = np.asarray(step(model, *chunk))
        outs.append(out[:, :size - pad] if members else out[:size - pad])
    return np.concatenate(outs, axis=1 if members else 0).astype(np.float32)


def write_npz(path: str, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` atomically: a temporary file beside it, then `os.replace`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message)
        print(f"error: {message}; run with --help for the options.", file=sys.stderr)
        sys.exit(USAGE)


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    prog = "jax-bcd-predict" if Path(sys.argv[0]).name == "jax-bcd-predict" else \
        "python -m distributed.predict"
    parser = _Parser(prog=prog, description=__doc__.split("\n\n")[0],
                     epilog="Inputs by model: mlp / equinox.nn.MLP: x (N, features); psf: "
                            "positions (N, 2), seds (N, n_lambda). Output: pred.")
    parser.add_argument("--model", required=True,
                        help="model file (<workdir>/model.eqx), or the training workdir")
    parser.add_argument("--data", required=True, help="input .npz (see below)")
    parser.add_argument("--out", required=True, help="output .npz, written with array 'pred'")
    parser.add_argument("--batch_size", type=int, default=256, help="rows per forward pass")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size={args.batch_size} must be >= 1")
    if not args.out.endswith(".npz"):
        parser.error(f"--out={args.out} must name an .npz file, e.g. pred.npz")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distributed.predict``; returns the exit code (0, or 2 for bad input)."""
    args = _args(argv)
    if (warning := check_import_name()) is not None:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        model, kind, members = load(args.model)
        inputs = read_inputs(args.data, _inputs_for(model, kind), kind)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return USAGE
    pred = predict(model, kind, inputs, args.batch_size, members)
    if members:
        write_npz(args.out, pred=pred.mean(0), pred_std=pred.std(0), pred_members=pred)
        print(f"wrote pred, pred_std {pred.shape[1:]} and pred_members {pred.shape} (ensemble "
              f"of {members} {kind} models, {pred.shape[1]} rows) to {args.out}")
        return 0
    write_npz(args.out, pred=pred)
    print(f"wrote pred {pred.shape} ({kind} model, {len(pred)} rows) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
