"""Where examples come from: in-memory arrays, `.npz` files and ArrayRecord files.

A dataset is a dict `name -> np.ndarray` whose arrays share a leading length `N` (one row per
example). Every reader here validates what it loads and raises one `DataError` naming the file or
array and the fix. Nothing is ever unpickled: `.npz` files are read with `allow_pickle=False`, and
each ArrayRecord record is the `np.savez` bytes of one example (see `write_array_record`).
"""

from __future__ import annotations

import glob as _glob
import io
import os
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

__all__ = [
    "DataError",
    "ArraySource",
    "InMemorySource",
    "ArrayRecordSource",
    "open_source",
    "load_arrays",
    "validate_arrays",
    "write_array_record",
    "split_arrays",
]

_AR_SUFFIXES = (".array_record", ".arrayrecord", ".ar")


class DataError(ValueError):
    """Bad input data: the message names the file or array and says how to fix it."""


def _check_finite(name: str, arr: np.ndarray, where: str, index_of: Any = None) -> None:
    """Raises if a floating `arr` has NaN/inf; `index_of[i]` maps row i to the example index."""
    if np.issubdtype(arr.dtype, np.inexact) and arr.size:
        bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            i = i if index_of is None else int(index_of[i])
            raise DataError(
                f"array {name!r} in {where} has NaN/inf at example index {i}; "
                "clean or drop those examples before training."
            )


def validate_arrays(
    arrays: Mapping[str, Any],
    *,
    expected_shapes: Mapping[str, Sequence[int | None]] | None = None,
    float_keys: Sequence[str] = (),
    where: str = "the dataset",
    check_finite: bool = True,
) -> dict[str, np.ndarray]:
    """Checks a dataset dict and returns it as `dict[str, np.ndarray]`.

    **Arguments:**

    - `arrays`: `name -> array-like`, all with the same leading length `N > 0`.
    - `expected_shapes`: optional `name -> trailing shape` (without `N`); `None` entries match any
      size. Each named array must exist and match.
    - `float_keys`: names of arrays that must have a floating dtype.
    - `where`: how to name the data in error messages (e.g. the file path).
    - `check_finite`: reject NaN/inf in floating arrays (naming the first bad example index).

    **Raises:** `DataError` for an empty dataset, a scalar or object array, mismatched lengths,
    a wrong trailing shape, a non-float array in `float_keys`, or NaN/inf.
    """
    if not isinstance(arrays, Mapping) or not arrays:
        raise DataError(f"{where} holds no arrays; pass a dict like {{'x': X, 'y': Y}}.")
    out: dict[str, np.ndarray] = {}
    first: tuple[str, int] | None = None  # (name, length) of the first array
    for name, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype == object or arr.dtype.kind in "USV":
            raise DataError(
                f"array {name!r} in {where} has dtype {arr.dtype}; only numeric arrays are "
                "supported (convert it to a float or int array)."
            )
        if arr.ndim == 0:
            raise DataError(
                f"array {name!r} in {where} is a scalar; every array needs a leading example "
                "axis (shape (N, ...))."
            )
        if arr.ndim > 1 and 0 in arr.shape[1:]:
            raise DataError(
                f"array {name!r} in {where} has shape {arr.shape}: each example is empty (no "
                f"features); give at least one value per example."
            )
        if first is None:
            first = (name, len(arr))
        elif len(arr) != first[1]:
            raise DataError(
                f"arrays {first[0]!r} (length {first[1]}) and {name!r} (length {len(arr)}) in "
                f"{where} have different numbers of examples; they must share the leading length."
            )
        out[str(name)] = arr
    if first is None or first[1] == 0:
        raise DataError(f"{where} is empty (0 examples); provide at least one example.")
    for name, shape in (expected_shapes or {}).items():
        if name not in out:
            raise DataError(
                f"{where} has no array {name!r} (found {sorted(out)}); add it or fix the key name."
            )
        got = out[name].shape[1:]
        if len(got) != len(shape) or any(
            s is not None and s != g for s, g in zip(shape, got, strict=True)
        ):
            raise DataError(
                f"array {name!r} in {where} has per-example shape {got}, expected "
                f"{tuple(shape)}; reshape the data or fix `expected_shapes`."
            )
    for name in float_keys:
        if name not in out:
            raise DataError(f"{where} has no array {name!r} (found {sorted(out)}).")
        if not np.issubdtype(out[name].dtype, np.floating):
            raise DataError(
                f"array {name!r} in {where} has dtype {out[name].dtype} but must be floating "
                f"point; convert it with .astype(np.float32)."
            )
    if check_finite:
        for name, arr in out.items():
            _check_finite(name, arr, where)
    return out


class ArraySource:
    """Random access to examples, gathered into batches. Subclasses: in memory, ArrayRecord."""

    def __len__(self) -> int:
        raise NotImplementedError

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Returns the examples at `indices`, stacked: `name -> (len(indices), ...)`."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.gather(np.asarray([index])).items()}


class InMemorySource(ArraySource):
    """A validated dict of arrays; `gather` is one vectorised take per array."""

    def __init__(self, arrays: Mapping[str, Any], **validate_kwargs: Any):
        self.arrays = validate_arrays(arrays, **validate_kwargs)
        self._n = len(next(iter(self.arrays.values())))

    def __len__(self) -> int:
        return self._n

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.take(v, indices, axis=0) for k, v in self.arrays.items()}


def _decode(record: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(record), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class ArrayRecordSource(ArraySource):
    """Examples stored one per record (`np.savez` bytes), read lazily by
    `grain.sources.ArrayRecordDataSource`. The first record is validated on open; every gathered
    batch is checked for consistent keys/shapes and NaN/inf, naming the record index."""

    def __init__(self, paths: Sequence[str], **validate_kwargs: Any):
        self.paths = list(paths)
        self._where = paths[0] if len(paths) == 1 else f"ArrayRecord files {self.paths}"
        for p in self.paths:
            if not os.path.isfile(p):
                raise DataError(f"data file {p!r} does not exist; check the path.")
        try:
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
            n = len(self._source)
            first = _decode(self._source[0]) if n else {}
        except Exception as e:  # noqa: BLE001 - any reader/decoder failure means a bad file
            raise DataError(
                f"{self._where} is not a readable ArrayRecord file of np.savez records ({e}); "
                "write it with distributed.write_array_record or pass an .npz file."
            ) from None
        if n == 0:
            raise DataError(f"{self._where} is empty (0 records); provide at least one example.")
        self._check_finite = validate_kwargs.pop("check_finite", True)
        rows = validate_arrays(
            {k: v[None] for k, v in first.items()},
            where=self._where,
            check_finite=False,
            **validate_kwargs,
        )
        self._spec = {k: (v.shape[1:], v.dtype) for k, v in rows.items()}
        self._n = n

    def __len__(self) -> int:
        return self._n

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        keys = [int(i) for i in np.asarray(indices).reshape(-1)]
        records = self._source.__getitems__(keys)
        cols: dict[str, list[np.ndarray]] = {k: [] for k in self._spec}
        for key, rec in zip(keys, records, strict=True):
            try:
                ex = _decode(rec)
            except Exception as e:  # noqa: BLE001
                raise DataError(
                    f"record {key} of {self._where} is not np.savez bytes ({e})."
                ) from None
            spec = {k: (v.shape, v.dtype) for k, v in ex.items()}
            if spec != self._spec:
                raise DataError(
                    f"record {key} of {self._where} has arrays {spec}, but record 0 has "
                    f"{self._spec}; every record must have the same keys, shapes and dtypes."
                )
            for k, v in ex.items():
                cols[k].append(v)
        out = {k: np.stack(v) for k, v in cols.items()}
        if self._check_finite:
            for name, arr in out.items():
                _check_finite(name, arr, self._where, index_of=keys)
        return out


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:  # a local file header, or an empty archive's end record
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def _load_npz(path: str, **validate_kwargs: Any) -> InMemorySource:
    try:
        is_zip = _is_zip(path)
    except OSError as e:
        raise DataError(f"{path!r} cannot be read ({e.strerror}); check the path.") from None
    if not is_zip:  # (np.load would try it as a pickle and say so)
        raise DataError(f"{path!r} is not an .npz file (an .npz is a zip archive of arrays); "
                        f"save the arrays with np.savez(path, x=..., y=...).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise DataError(
            f"{path!r} is not a readable .npz file ({e}); re-save it with "
            "np.savez(path, x=..., y=...) without object arrays."
        ) from None
    return InMemorySource(arrays, where=path, **validate_kwargs)


def _resolve_paths(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if not isinstance(source, (str, os.PathLike)):
        return [os.fspath(p) for p in source]
    s = os.fspath(source)
    if os.path.isdir(s):
        raise DataError(f"{s!r} is a directory, not a data file; give an .npz or ArrayRecord "
                        f"file, or a glob of ArrayRecord files (e.g. {s}/*.array_record).")
    if os.path.exists(s) or not any(c in s for c in "*?["):
        return [s]  # a real file whose name has glob characters is that file
    paths = sorted(_glob.glob(s))
    if not paths:
        raise DataError(f"no data files match the pattern {s!r}; check the path.")
    return paths


def open_source(
    source: Any,
    *,
    keys: Sequence[str] | None = None,
    expected_shapes: Mapping[str, Sequence[int | None]] | None = None,
    float_keys: Sequence[str] = (),
    check_finite: bool = True,
) -> ArraySource:
    """Opens `source` as an `ArraySource` (validated; see `validate_arrays`).

    `source` is one of: an `ArraySource` (returned as is); a dict of arrays; a tuple/list of
    arrays named by `keys` (default `("x", "y")` for a pair); a path to a `.npz` file; an
    ArrayRecord file, glob pattern, or list of files (read lazily). Raises `DataError`.
    """
    kw = dict(expected_shapes=expected_shapes, float_keys=float_keys, check_finite=check_finite)
    if isinstance(source, ArraySource):
        return source
    if isinstance(source, Mapping):
        return InMemorySource(source, **kw)
    if (
        isinstance(source, (tuple, list))
        and source
        and not isinstance(source[0], (str, os.PathLike))
    ):
        if keys is None and len(source) == 2:
            keys = ("x", "y")
        if keys is None or len(keys) != len(source):
            raise DataError(
                f"got a tuple of {len(source)} arrays but keys={keys!r}; pass keys=(...) with "
                "one name per array."
            )
        return InMemorySource(dict(zip(keys, source, strict=True)), **kw)
    if not isinstance(source, (str, os.PathLike, tuple, list)):
        raise DataError(
            f"cannot read data from a {type(source).__name__}; pass a dict of arrays, a tuple "
            "with keys=, an .npz path, or ArrayRecord path(s)."
        )
    paths = _resolve_paths(source)
    if not paths:
        raise DataError("got an empty list of data files; pass at least one path.")
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(f"data file {p!r} does not exist; check the path.")
    if len(paths) == 1 and (paths[0].endswith(".npz") or _is_zip(paths[0])):
        return _load_npz(paths[0], **kw)
    for p in paths:
        if p.endswith((".npz", ".npy", ".pkl", ".pickle")):
            raise DataError(f"{p!r} cannot be mixed with other files; pass one .npz file.")
    return ArrayRecordSource(paths, **kw)


def load_arrays(source: Any, **kwargs: Any) -> dict[str, np.ndarray]:
    """Reads `source` (anything `open_source` takes) fully into memory, validated.

    **Returns:** `dict[str, np.ndarray]` with a common leading length.
    """
    src = open_source(source, **kwargs)
    if isinstance(src, InMemorySource):
        return dict(src.arrays)
    return src.gather(np.arange(len(src)))


def write_array_record(path: str | os.PathLike, arrays: Mapping[str, Any]) -> str:
    """Writes a dataset to one ArrayRecord file, one example per record (`np.savez` bytes,
    `group_size:1` for fast random access). Validates `arrays` first. Returns the path."""
    from array_record.python.array_record_module import ArrayRecordWriter

    arrays = validate_arrays(arrays, where=os.fspath(path))
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = ArrayRecordWriter(path, "group_size:1")
    try:
        for i in range(len(next(iter(arrays.values())))):
            buf = io.BytesIO()
            np.savez(buf, **{k: v[i] for k, v in arrays.items()})
            writer.write(buf.getvalue())
    finally:
        writer.close()
    return path


def split_arrays(
    arrays: Mapping[str, Any], fractions: float | Sequence[float], seed: int
) -> tuple[dict[str, np.ndarray], ...]:
    """Splits a dataset into disjoint random parts, deterministic in `seed`.

    `fractions` is e.g. `(0.8, 0.2)` or `0.8` (same thing). If they sum to 1 the last part takes
    the rounding remainder, so every example lands in exactly one part.
    """
    arrays = validate_arrays(arrays, check_finite=False)
    fr = [float(fractions), 1.0 - float(fractions)] if np.isscalar(fractions) else list(fractions)
    if not fr or any(f <= 0 for f in fr) or sum(fr) > 1 + 1e-9:
        raise DataError(
            f"split fractions {fractions!r} must be positive and sum to at most 1, e.g. (0.8, 0.2)."
        )
    n = len(next(iter(arrays.values())))
    sizes = [int(np.floor(f * n)) for f in fr]
    if abs(sum(fr) - 1) <= 1e-9:
        sizes[-1] = n - sum(sizes[:-1])
    if any(s == 0 for s in sizes):
        raise DataError(
            f"split fractions {fractions!r} of {n} examples give an empty part (sizes {sizes}); "
            "use more data or larger fractions."
        )
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *sizes])
    return tuple(
        {k: v[perm[a:b]] for k, v in arrays.items()}
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    )
