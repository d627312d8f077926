"""Tests for distributed.data / distributed.data_sources: order, sharding, state, files, errors."""

import io
import json
import os

import grain
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from distributed.core.clock import EpochClock
from distributed.core.mesh import check_batch_size
from distributed.core.sharding import batch_sharding
from distributed.data import (
    DataError,
    DevicePrefetcher,
    epoch_batches,
    load_arrays,
    make_dataset,
    open_source,
    split_arrays,
    to_global,
    write_array_record,
)

N = 24


def _arrays(n=N):
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    return {"x": x, "y": x.sum(axis=1, keepdims=True), "id": np.arange(n)}


def _ids(ds, k):
    it = iter(ds)
    return [next(it)["id"] for _ in range(k)]


def _make(source=None, **kw):
    kw = {"global_batch_size": 6, "seed": 0, "process_index": 0, "process_count": 1} | kw
    return make_dataset(_arrays() if source is None else source, **kw)


def steps_per_epoch(n, b):
    return EpochClock(n, b).steps(1)


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Explicit,) * len(shape))


# --- order and determinism ------------------------------------------------------------------


def test_same_seed_same_batches_other_seed_differs():
    a = _ids(_make(seed=3), 8)
    b = _ids(_make(seed=3), 8)
    c = _ids(_make(seed=4), 8)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c, strict=True))


def test_each_epoch_is_a_new_permutation():
    spe = steps_per_epoch(N, 6)
    ids = _ids(_make(), 3 * spe)
    epochs = [np.concatenate(ids[e * spe : (e + 1) * spe]) for e in range(3)]
    for e in epochs:  # every example exactly once per epoch
        np.testing.assert_array_equal(np.sort(e), np.arange(N))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0], np.arange(N))  # actually shuffled


def test_no_shuffle_is_in_order_and_values_follow_ids():
    batches = _ids(_make(shuffle=False), 4)
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(N))
    b = next(iter(_make()))
    np.testing.assert_array_equal(b["x"], _arrays()["x"][b["id"]])
    assert b["x"].dtype == np.float32 and b["y"].shape == (6, 1)


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_example_every_epoch_remainders_carried(shuffle):
    """24 examples, batch 5: no row is ever dropped. Epoch e's last rows share a batch with the
    first rows of epoch e+1; 2 epochs are ceil(48 / 5) = 10 full batches."""
    ids = [b["id"] for b in _make(global_batch_size=5, num_epochs=2, shuffle=shuffle)]
    assert len(ids) == 10 and all(len(i) == 5 for i in ids)
    stream = np.concatenate(ids)
    for e in range(2):  # positions [24e, 24e + 24) are one order of all 24 examples
        np.testing.assert_array_equal(np.sort(stream[24 * e:24 * (e + 1)]), np.arange(N))
    if not shuffle:  # rows 20-23 are trained: the 5th batch is [20..23, 0]
        np.testing.assert_array_equal(ids[4], [20, 21, 22, 23, 0])


def test_forty_rows_batch_32_trains_every_row():
    """The reported case: 40 rows, batch 32, in order: rows 32-39 used to be never trained."""
    x = {"id": np.arange(40), "x": np.zeros((40, 1), np.float32)}
    ids = [b["id"] for b in make_dataset(x, global_batch_size=32, seed=0, shuffle=False,
                                         num_epochs=3, process_index=0, process_count=1)]
    clock = EpochClock(40, 32)
    assert len(ids) == clock.steps(3) == 4
    seen = np.concatenate(ids)
    assert set(seen[:40]) == set(range(40)) and set(seen[40:80]) == set(range(40))
    assert [clock.epoch_ending_at(s) for s in range(1, 5)] == [None, 0, 1, 2]


def test_epoch_batches_equal_make_dataset_slice():
    spe = steps_per_epoch(N, 6)
    stream = _ids(_make(seed=7), 3 * spe)
    for epoch in (0, 2):
        one = epoch_batches(
            _arrays(), global_batch_size=6, seed=7, epoch=epoch, process_index=0, process_count=1
        )
        assert len(one) == spe
        for got, want in zip(
            [b["id"] for b in one], stream[epoch * spe : (epoch + 1) * spe], strict=True
        ):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("batch", [4, 6])
def test_two_processes_split_each_global_batch(batch):
    k = 3 * steps_per_epoch(N, batch) // 2 + 1  # runs into the second epoch
    glob = _ids(_make(global_batch_size=batch), k)
    p0 = _ids(_make(global_batch_size=batch, process_index=0, process_count=2), k)
    p1 = _ids(_make(global_batch_size=batch, process_index=1, process_count=2), k)
    for g, a, b in zip(glob, p0, p1, strict=True):
        assert len(a) == len(b) == batch // 2
        assert not set(a) & set(b)
        np.testing.assert_array_equal(np.concatenate([a, b]), g)


# --- host batch -> global jax.Array ----------------------------------------------------------


@pytest.mark.parametrize(
    "shape,names,spec",
    [
        ((8,), ("data",), P(("data",))),
        ((4, 2), ("data", "fsdp"), P(("data", "fsdp"))),
        ((4, 2), ("data", "tensor"), P(("data",))),
    ],
)
def test_to_global_shards_dim0(shape, names, spec):
    mesh = _mesh(shape, names)
    host = next(iter(_make(global_batch_size=8)))
    out = to_global(host, mesh)
    assert out.keys() == host.keys()
    for k, arr in out.items():
        assert arr.sharding.is_equivalent_to(jax.NamedSharding(mesh, spec), arr.ndim)
        np.testing.assert_array_equal(np.asarray(arr), host[k])
    rows = [s.data.shape[0] for s in out["x"].addressable_shards]
    n_shards = 8 if "fsdp" in names or names == ("data",) else 4
    assert rows == [8 // n_shards] * 8
    assert batch_sharding(mesh).spec == spec


def test_to_global_rejects_indivisible_batch():
    with pytest.raises(DataError, match=r"'x'.*6 rows.*8 batch shards"):
        to_global({"x": np.zeros((6, 2), np.float32)}, _mesh((8,), ("data",)))


# --- checkpointable position -----------------------------------------------------------------


def test_state_round_trip_mid_epoch_and_across_epochs():
    ds = _make()
    it = iter(ds)
    for _ in range(3):  # mid epoch 0 (4 batches per epoch)
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what grain's Orbax handler writes
    assert state == {"next_index": 3}
    want = [next(it)["id"] for _ in range(6)]  # crosses into epoch 2
    fresh = iter(_make())
    fresh.set_state(state)
    got = [next(fresh)["id"] for _ in range(6)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_device_prefetcher_state_is_what_was_consumed():
    mesh = _mesh((4, 2), ("data", "fsdp"))
    ref = _ids(_make(global_batch_size=8), 6)
    pf = DevicePrefetcher(iter(_make(global_batch_size=8)), mesh, size=2)
    assert pf.get_state() == {"next_index": 0}
    for i in range(2):
        b = next(pf)
        assert isinstance(b["x"], jax.Array) and b["x"].sharding.mesh.shape == mesh.shape
        np.testing.assert_array_equal(np.asarray(b["id"]), ref[i])
    # the wrapped iterator has read ahead; the prefetcher reports what was handed out
    assert pf.get_state() == {"next_index": 2}
    assert pf.batches_out == 2 and pf.wait_s > 0
    state = json.loads(json.dumps(pf.get_state()))
    resumed = DevicePrefetcher(iter(_make(global_batch_size=8)), mesh, size=3)
    resumed.set_state(state)
    for i in range(2, 6):
        np.testing.assert_array_equal(np.asarray(next(resumed)["id"]), ref[i])
    pf.set_state({"next_index": 5})
    np.testing.assert_array_equal(np.asarray(next(pf)["id"]), ref[5])


def test_grain_checkpoint_handler_round_trips_prefetcher(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    from etils import epath

    mesh = _mesh((8,), ("data",))
    pf = DevicePrefetcher(iter(_make(global_batch_size=8)), mesh)
    next(pf)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(pf))
    want = np.asarray(next(pf)["id"])
    restored = DevicePrefetcher(iter(_make(global_batch_size=8)), mesh)
    handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(restored))
    np.testing.assert_array_equal(np.asarray(next(restored)["id"]), want)


def test_prefetcher_stops_with_finite_dataset():
    mesh = _mesh((8,), ("data",))
    pf = DevicePrefetcher(iter(_make(global_batch_size=8, num_epochs=1)), mesh, size=2)
    assert len(list(pf)) == 3


@pytest.mark.slow
def test_worker_processes_keep_the_order():
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
        flags.FLAGS.mark_as_parsed()
    it = iter(_make(worker_count=1))
    try:
        got = [next(it)["id"] for _ in range(5)]
    finally:
        it.close()
    for g, w in zip(got, _ids(_make(), 5), strict=True):
        np.testing.assert_array_equal(g, w)


# --- files -----------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, **_arrays())
    loaded = load_arrays(str(path))
    for k, v in _arrays().items():
        np.testing.assert_array_equal(loaded[k], v)
    for g, w in zip(_ids(_make(str(path)), 5), _ids(_make(), 5), strict=True):
        np.testing.assert_array_equal(g, w)


def test_array_record_round_trip_files_and_glob(tmp_path):
    a = _arrays()
    write_array_record(tmp_path / "d-0.array_record", {k: v[:10] for k, v in a.items()})
    write_array_record(tmp_path / "d-1.array_record", {k: v[10:] for k, v in a.items()})
    for src in (str(tmp_path / "d-*.array_record"), sorted(map(str, tmp_path.iterdir()))):
        loaded = load_arrays(src)
        for k, v in a.items():
            np.testing.assert_array_equal(loaded[k], v)
            assert loaded[k].dtype == v.dtype
        got = _ids(_make(src, process_index=1, process_count=2), 5)
        want = _ids(_make(process_index=1, process_count=2), 5)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_tuple_source_and_split():
    x, y = np.ones((10, 2), np.float32), np.zeros((10, 1), np.float32)
    assert set(load_arrays((x, y))) == {"x", "y"}
    assert set(load_arrays((x, y, y), keys=("a", "b", "c"))) == {"a", "b", "c"}
    a = _arrays()
    tr, va = split_arrays(a, (0.75, 0.25), seed=1)
    tr2, _ = split_arrays(a, 0.75, seed=1)
    assert len(tr["id"]) == 18 and len(va["id"]) == 6
    assert not set(tr["id"]) & set(va["id"])
    np.testing.assert_array_equal(tr["id"], tr2["id"])
    np.testing.assert_array_equal(tr["x"], a["x"][tr["id"]])


# --- one clear DataError per bad input -------------------------------------------------------


def _bad_files(tmp_path):
    np.savez(tmp_path / "ok.npz", **_arrays())
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:100])
    (tmp_path / "text.txt").write_text("just some text, not data\n" * 10)
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))


@pytest.mark.parametrize(
    "name,match",
    [
        ("missing.npz", r"missing\.npz' does not exist"),
        ("trunc.npz", r"trunc\.npz' is not a readable \.npz"),
        ("text.txt", r"text\.txt is not a readable ArrayRecord"),
        ("obj.npz", r"obj\.npz' is not a readable \.npz"),
        ("nomatch-*.array_record", r"no data files match the pattern .*nomatch"),
    ],
)
def test_bad_files_raise_data_error(tmp_path, name, match):
    _bad_files(tmp_path)
    with pytest.raises(DataError, match=match):
        load_arrays(str(tmp_path / name))


@pytest.mark.parametrize(
    "arrays,kw,match",
    [
        ({"x": np.zeros((4, 2)), "y": np.zeros((5, 1))}, {}, r"'x' \(length 4\).*'y' \(length 5\)"),
        (
            {"x": np.zeros((4, 2))},
            {"expected_shapes": {"x": (3,)}},
            r"'x'.*\(2,\), expected \(3,\)",
        ),
        ({"x": np.zeros((4, 2))}, {"expected_shapes": {"y": (1,)}}, r"no array 'y'"),
        ({"x": np.zeros((4, 2), np.int32)}, {"float_keys": ["x"]}, r"'x'.*int32.*floating"),
        ({"x": np.zeros((0, 2))}, {}, r"empty \(0 examples\)"),
        ({}, {}, r"no arrays"),
        ({"s": np.array(["a", "b"])}, {}, r"'s'.*dtype <U1"),
    ],
)
def test_bad_arrays_raise_data_error(arrays, kw, match):
    with pytest.raises(DataError, match=match):
        open_source(arrays, **kw)


def _write_raw_array_record(path, arrays):
    """Like write_array_record but without validation, to plant bad values."""
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(path), "group_size:1")
    for i in range(len(arrays["x"])):
        buf = io.BytesIO()
        np.savez(buf, **{k: v[i] for k, v in arrays.items()})
        w.write(buf.getvalue())
    w.close()
    return str(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_name_array_and_index(tmp_path, bad):
    a = _arrays()
    a["x"][5, 1] = bad
    with pytest.raises(DataError, match=r"'x' in the dataset has NaN/inf at example index 5"):
        make_dataset(a, global_batch_size=4, seed=0)
    np.savez(tmp_path / "bad.npz", **a)
    with pytest.raises(DataError, match=r"'x' in .*bad\.npz has NaN/inf at example index 5"):
        load_arrays(str(tmp_path / "bad.npz"))
    # ArrayRecord files are read lazily: a bad record is reported when its batch is read.
    path = _write_raw_array_record(tmp_path / "bad.array_record", a)
    ds = _make(path, shuffle=False, num_epochs=1)
    with pytest.raises(
        DataError, match=r"'x' in .*bad\.array_record has NaN/inf at example index 5"
    ):
        list(ds)
    with pytest.raises(DataError, match=r"index 5"):
        load_arrays(path)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"global_batch_size": 6, "process_count": 4}, r"batch_size=6 .*4 processes"),
        ({"global_batch_size": 6, "mesh": "8"}, r"batch_size=6 .*8 batch shards.*data=8"),
        ({"global_batch_size": 6, "mesh": "42"}, r"batch_size=6 .*8 .*data=4 x fsdp=2"),
        ({"global_batch_size": 32}, r"batch size 32 is larger than the dataset \(24 examples\)"),
        ({"global_batch_size": 0}, r"batch_size=0 must be a positive integer"),
    ],
)
def test_bad_batch_size_raises_data_error(kw, match):
    meshes = {"8": _mesh((8,), ("data",)), "42": _mesh((4, 2), ("data", "fsdp"))}
    if "mesh" in kw:
        kw["mesh"] = meshes[kw["mesh"]]
    with pytest.raises(DataError, match=match):
        make_dataset(_arrays(), seed=0, process_index=0, **kw)
    check_batch_size(8, meshes["42"], 2, num_examples=24)  # fine


def test_tuple_without_keys_raises():
    with pytest.raises(DataError, match=r"tuple of 3 arrays.*keys="):
        open_source((np.zeros(3), np.zeros(3), np.zeros(3)))


_TWO_PROCESS_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from jax.experimental import multihost_utils
from distributed.data import DevicePrefetcher, make_dataset
a = {"x": np.arange(72, dtype=np.float32).reshape(24, 3), "id": np.arange(24)}
mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
pf = DevicePrefetcher(iter(make_dataset(a, global_batch_size=8, seed=0, mesh=mesh)), mesh)
for _ in range(4):
    b = next(pf)
    ids = multihost_utils.process_allgather(b["id"], tiled=True)
    total = float(jax.jit(lambda x: x.sum())(b["x"]))
    print(json.dumps({"ids": np.asarray(ids).tolist(), "sum": total, "state": pf.get_state()}))
"""


@pytest.mark.slow
def test_two_real_processes_form_the_single_process_global_batch(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        addr = f"localhost:{s.getsockname()[1]}"
    script = tmp_path / "child.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), addr, str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    ref = iter(_make(global_batch_size=8))
    lines = [[json.loads(ln) for ln in out.splitlines() if ln.startswith("{")] for out, _ in outs]
    assert lines[0] == lines[1] and len(lines[0]) == 4
    for k, rec in enumerate(lines[0]):
        want = next(ref)
        assert rec["ids"] == want["id"].tolist()
        assert rec["sum"] == float(want["x"].sum())
        assert rec["state"] == {"next_index": k + 1}


@pytest.mark.parametrize("seed,n", [(0, 512), (5, 37), (2**40, 1000), (1, 40_000)])
def test_epoch_orders_drawn_in_blocks_are_each_epochs_own_permutation(seed, n):
    """The host pipeline draws many epochs' orders per call (`epoch_permutation`, for one
    epoch per seed, draws one); each must be jax.random.permutation of its epoch_key, as the
    devices draw it (also across the blocks' edges)."""
    from distributed.data.pipeline import _ahead, epoch_key, epoch_permutation

    for epoch in (0, 1, 25, 26, 63, 64, 65, 130):
        want = np.asarray(jax.random.permutation(epoch_key(seed, epoch), n))
        for got in (_ahead(seed, epoch, n), epoch_permutation(seed, epoch, n)):
            assert got.dtype == np.int64 and not got.flags.writeable
            np.testing.assert_array_equal(got, want)
