import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from distributed.core.metrics import (
    Metrics,
    average_metrics,
    compute_metrics,
    format_metrics,
    print_metrics,
    tree_all_finite,
    tree_norm,
)
from distributed.loop.writers import JsonlWriter, MetricsWriter, MultiWriter, TensorBoardWriter


def test_compute_metrics_seed_example(capsys):
    yt = np.array([0.95, 0.90, 0.85])
    yp = np.array([0.94, 0.91, 0.86])
    m = compute_metrics(yt, yp)
    err = yp - yt
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean(err**2))) and m["rmse"] == pytest.approx(0.01)
    assert m["mae"] == pytest.approx(0.01)
    assert m["mape"] == pytest.approx(100 * np.mean(np.abs(err) / yt))  # percent, ~1.113
    ss_tot = np.sum((yt - yt.mean()) ** 2)
    assert m["r2"] == pytest.approx(1 - np.sum(err**2) / ss_tot)  # 0.94
    assert m["per_output_rmse"] == {"0": pytest.approx(0.01)}
    assert all(isinstance(m[k], np.floating) for k in ("rmse", "mae", "mape", "r2"))
    print_metrics(m)
    out = capsys.readouterr().out.splitlines()
    assert out == ["RMSE: 0.0100", "MAE:  0.0100", "MAPE: 1.11%", "R²:   0.9400"]


def test_compute_metrics_two_d_per_output():
    rng = np.random.default_rng(0)
    yt = rng.normal(size=(20, 3)) + 5
    yp = yt + rng.normal(scale=[0.1, 0.2, 0.3], size=(20, 3))
    m = compute_metrics(yt, jnp.asarray(yp, jnp.float32), output_names=["V", "g", "r"])
    per = np.sqrt(np.mean((yp - yt) ** 2, axis=0))
    assert list(m["per_output_rmse"]) == ["V", "g", "r"]
    np.testing.assert_allclose(list(m["per_output_rmse"].values()), per, rtol=1e-5)
    np.testing.assert_allclose(m["rmse"], np.sqrt(np.mean((yp - yt) ** 2)), rtol=1e-5)
    r2 = 1 - np.sum((yp - yt) ** 2, 0) / np.sum((yt - yt.mean(0)) ** 2, 0)
    np.testing.assert_allclose(m["r2"], r2.mean(), rtol=1e-5)
    from sklearn.metrics import r2_score

    np.testing.assert_allclose(m["r2"], r2_score(yt, np.asarray(yp, np.float32)), rtol=1e-5)
    with pytest.raises(ValueError, match="2 names.*3 outputs"):
        compute_metrics(yt, yp, output_names=["a", "b"])
    with pytest.raises(ValueError, match=r"\(20, 3\) and \(20,\)"):
        compute_metrics(yt, yp[:, 0])


def test_compute_metrics_constant_target():
    assert compute_metrics(np.ones(3), np.ones(3))["r2"] == 1.0
    assert compute_metrics(np.ones(3), np.array([1.0, 2.0, 1.0]))["r2"] == 0.0


def test_average_and_format_metrics():
    avg = average_metrics([Metrics(values={"loss": 1.0}), Metrics(values={"loss": 2.0})])
    assert isinstance(avg, Metrics) and avg.values == {"loss": 1.5}
    assert format_metrics(avg) == "loss: 1.5000"
    d = average_metrics([{"loss": jnp.array(1.0), "acc": 0.5}, {"loss": 3.0}])
    assert d == {"loss": 2.0, "acc": 0.5}
    assert format_metrics(d) == "loss: 2.0000 | acc: 0.5000"
    with pytest.raises(ValueError, match="empty"):
        average_metrics([])
    with pytest.raises(TypeError, match="list"):
        average_metrics([[1.0]])


def test_tree_norm_and_all_finite():
    tree = {"a": jnp.array([3.0, 0.0]), "b": None, "c": (jnp.array([[4.0]]), 7, "x")}
    assert float(tree_norm(tree)) == pytest.approx(5.0)
    assert float(tree_norm({"b": None})) == 0.0
    assert bool(tree_all_finite(tree))
    assert bool(tree_all_finite(None))
    bad = {"a": jnp.array([1.0, jnp.nan]), "b": jnp.array([1.0])}
    assert not bool(tree_all_finite(bad))
    assert not bool(tree_all_finite({"a": jnp.array([jnp.inf], jnp.bfloat16)}))
    import jax

    assert float(jax.jit(tree_norm)(tree["a"])) == pytest.approx(3.0)


def test_jsonl_writer_roundtrip(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    with JsonlWriter(path) as w:
        assert isinstance(w, MetricsWriter)
        w.write(
            1,
            {
                "loss": jnp.array(0.5),
                "lr": np.float32(1e-3),
                "n": np.int64(3),
                "phase": "param",
                "bad": float("nan"),
                "vec": np.array([1.0, 2.0]),
            },
        )
        w.write(np.int64(2), {"loss": 0.25, "ok": np.bool_(True), "val": {"rmse": 0.1}})
    with JsonlWriter(path) as w:  # appends
        w.write(3, {"loss": float("inf")})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {
        "step": 1,
        "loss": 0.5,
        "lr": pytest.approx(1e-3),
        "n": 3,
        "phase": "param",
        "bad": None,
        "vec": [1.0, 2.0],
    }
    assert lines[1] == {"step": 2, "loss": 0.25, "ok": True, "val": {"rmse": 0.1}}
    assert lines[2] == {"step": 3, "loss": None}
    with JsonlWriter(path) as w, pytest.raises(TypeError, match="object"):
        w.write(4, {"x": object()})


def _read_scalars(logdir):
    """Decode TFRecord event files (length, crc, data, crc) with tensorboardX's protobufs."""
    from tensorboardX.proto import event_pb2

    out = []
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.append((ev.step, v.tag, v.simple_value))
    return out


def test_tensorboard_and_multi_writer(tmp_path):
    tb = TensorBoardWriter(tmp_path / "tb")
    js = JsonlWriter(tmp_path / "m.jsonl")
    with MultiWriter([tb, js]) as w:
        w.write(5, {"loss": jnp.array(0.5), "phase": "param", "val": {"rmse": 0.25}})
        w.write(6, {"loss": 0.125})
    scalars = _read_scalars(tmp_path / "tb")
    assert (5, "train/loss", 0.5) in scalars and (5, "val/rmse", 0.25) in scalars
    assert (6, "train/loss", 0.125) in scalars
    assert not any(tag == "phase" for _, tag, _ in scalars)
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2
    with pytest.raises(TypeError, match="write"):
        MultiWriter([object()])
