"""Our `distributed.Trainer` against two peers' trainers on their own tasks, side by side.

1. **desisky 0.9.0**: its `BroadbandTrainer` (an ``eqx.filter_jit`` step per batch fed by a
   torch `DataLoader` with shuffling, ``float(loss)`` every step, the test loss every epoch) on
   a broadband-like regression: ``rows`` synthetic rows, 6 inputs -> 4 outputs, desisky's MLP
   (``eqx.nn.MLP`` width 128, depth 5), Huber loss (delta 0.25), Adam 1e-3, ``epochs`` epochs,
   at batch 32 and 256; ours: `Trainer` with the same model, loss, optimizer, epochs, batch
   and shuffling, on a one-device mesh.
2. **opifex 0.2.0**: its `Trainer` (flax nnx, ``nnx.jit`` step, in-order batches: it has no
   shuffling) on y = sin(3x): MLP [1, 32, 32, 1] tanh, ``points`` points, batch 64, Adam 1e-3,
   MSE, ``opifex_epochs`` epochs, test loss every epoch; ours with shuffling on.

Each variant is timed as one call of its ``train`` / ``fit`` (compilation included: every
trainer compiles its step inside that call), runs interleaved (ours, peer, peer, ours, ...).
Reported: samples/s (rows x epochs / seconds), the ratio ours / peer (median of runs), each
side's best test loss over the epochs and whether ours is within 5% of the peer's (the ratio
counts only at equal loss). Targets: >= 8x desisky at batch 32, >= 3x at 256, >= 3x opifex.

The peers are optional (``pip install .[bench-peers]``: desisky with its torch/pandas training
deps, opifex): a missing one is reported as ``{"skipped": "desisky not installed"}``.

    python benchmarks/vs_peers.py [--quick] [--peers=desisky,opifex] [--runs=1]
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import time

import common


@dataclasses.dataclass
class Config:
    peers: str = "desisky,opifex"
    rows: int = 20_000  # desisky task: training rows (6 -> 4)
    test_rows: int = 2_000
    epochs: int = 20
    batches: str = "32,256"
    points: int = 4_096  # opifex task: training points of sin(3x)
    opifex_epochs: int = 200
    opifex_batch: int = 64
    runs: int = 1  # interleaved runs per variant
    loss_tolerance: float = 0.05  # ours' best test loss <= (1 + this) x the peer's
    target_desisky_32: float = 8.0
    target_desisky_256: float = 3.0
    target_opifex: float = 3.0
    quick: bool = False
    devices: int = 0


QUICK = dict(rows=512, test_rows=128, epochs=2, points=256, opifex_epochs=2)


def installed(peer: str) -> str | None:
    """None when ``peer``'s trainer can be imported, else the reason to skip it."""
    need = {"desisky": ("desisky", "torch", "pandas"), "opifex": ("opifex", "flax")}[peer]
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"{peer} not installed (missing {', '.join(missing)})" if missing else None


# ------------------------------------------------------------------------------- the tasks
def broadband_data(rows: int, test_rows: int, seed: int = 0):
    """Synthetic broadband-like rows: 6 observing conditions -> 4 smooth 'magnitudes'."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, 4)).astype(np.float32)

    def make(n):
        x = rng.uniform(-1, 1, size=(n, 6)).astype(np.float32)
        y = np.tanh(x @ w) + 0.3 * np.sin(2 * x[:, :4]) + 0.05 * rng.normal(size=(n, 4))
        return x, y.astype(np.float32)

    return make(rows), make(test_rows)


def sine_data(points: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(points, 1)).astype(np.float32)
    xt = np.linspace(-1, 1, 512, dtype=np.float32)[:, None]
    return (x, np.sin(3 * x)), (xt, np.sin(3 * xt))


# ------------------------------------------------------------------------------- trainers
def ours(model, train, test, *, epochs, batch, loss, **loss_kw) -> dict:
    import jax

    from distributed import Trainer, TrainingConfig
    from distributed.core.mesh import make_mesh

    cfg = TrainingConfig(epochs=epochs, batch_size=batch, learning_rate=1e-3, loss=loss,
                         print_every=0, validate_every=1, shuffle=True, save_best=False,
                         early_stopping=False, **loss_kw)
    mesh = make_mesh("data:1", jax.devices()[:1])
    t = time.perf_counter()
    _, history = Trainer(model, cfg, mesh=mesh).train(train, test)
    return {"seconds": time.perf_counter() - t, "best_test_loss": float(history.best_val_loss)}


def desisky_run(model, train, test, *, epochs, batch) -> dict:
    import numpy as np
    import torch
    from desisky.training import BroadbandTrainer, NumpyLoader, TrainingConfig
    from torch.utils.data import Dataset

    class Rows(Dataset):  # as desisky's SkyBrightnessDataset: numpy (inputs, targets, index)
        def __init__(self, data):
            self.x, self.y = data

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.y[i], np.int64(i)

    def loader(data, shuffle):
        return NumpyLoader(Rows(data), batch_size=batch, shuffle=shuffle)

    torch.manual_seed(0)
    cfg = TrainingConfig(epochs=epochs, learning_rate=1e-3, loss="huber", huber_delta=0.25,
                         save_best=False, print_every=10**9, validate_every=1)
    t = time.perf_counter()
    _, history = BroadbandTrainer(model, cfg).train(loader(train, True), loader(test, False))
    return {"seconds": time.perf_counter() - t, "best_test_loss": float(history.best_test_loss)}


def opifex_run(train, test, *, epochs, batch) -> dict:
    import jax.numpy as jnp
    from flax import nnx
    from opifex.core.training.config import CheckpointConfig, OptimizationConfig, TrainingConfig
    from opifex.core.training.trainer import Trainer

    class MLP(nnx.Module):
        def __init__(self, sizes, rngs):
            self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                                    for a, b in zip(sizes[:-1], sizes[1:], strict=True)])

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = jnp.tanh(layer(x))
            return self.layers[-1](x)

    best = {"loss": float("inf")}

    def on_epoch(epoch, metrics):
        if "final_val_loss" in metrics:
            best["loss"] = min(best["loss"], metrics["final_val_loss"])

    cfg = TrainingConfig(num_epochs=epochs, batch_size=batch, learning_rate=1e-3,
                         validation_frequency=1, verbose=False, progress_callback=on_epoch,
                         optimization_config=OptimizationConfig(learning_rate=1e-3),
                         checkpoint_config=CheckpointConfig(checkpoint_dir=""))
    trainer = Trainer(MLP([1, 32, 32, 1], nnx.Rngs(0)), cfg)
    t = time.perf_counter()
    trainer.fit((jnp.asarray(train[0]), jnp.asarray(train[1])),
                (jnp.asarray(test[0]), jnp.asarray(test[1])))
    return {"seconds": time.perf_counter() - t, "best_test_loss": best["loss"]}


# ------------------------------------------------------------------------------- comparison
def compare(cfg: Config, name: str, samples: int, run_ours, run_peer, target: float) -> dict:
    """Interleaved runs of ours and the peer; samples/s, ratio, losses, verdict."""
    rec: dict[str, list[dict]] = {"ours": [], "peer": []}
    for r in range(cfg.runs):
        order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")
        for side in order:
            rec[side].append(run_ours() if side == "ours" else run_peer())
    sps = {s: [samples / x["seconds"] for x in v] for s, v in rec.items()}
    loss = {s: min(x["best_test_loss"] for x in v) for s, v in rec.items()}
    ratio = statistics.median(sps["ours"]) / statistics.median(sps["peer"])
    equal = loss["ours"] <= (1 + cfg.loss_tolerance) * loss["peer"]
    return {"variant": name, "samples": samples,
            "samples_per_s_ours": common.summarize(sps["ours"], 1),
            "samples_per_s_peer": common.summarize(sps["peer"], 1),
            "ratio": round(ratio, 3), "target": target,
            "best_test_loss_ours": float(f"{loss['ours']:.4g}"),
            "best_test_loss_peer": float(f"{loss['peer']:.4g}"),
            "equal_test_loss": bool(equal),
            "meets_target": bool(equal and ratio >= target)}


def vs_desisky(cfg: Config) -> list[dict]:
    import equinox as eqx
    import jax

    train, test = broadband_data(cfg.rows, cfg.test_rows)
    model = lambda: eqx.nn.MLP(6, 4, 128, 5, key=jax.random.key(42))  # noqa: E731
    out = []
    for batch in (int(b) for b in cfg.batches.split(",")):
        target = cfg.target_desisky_32 if batch <= 32 else cfg.target_desisky_256
        out.append(compare(
            cfg, f"desisky_batch{batch}", cfg.rows * cfg.epochs,
            lambda b=batch: ours(model(), train, test, epochs=cfg.epochs, batch=b,
                                 loss="huber", huber_delta=0.25),
            lambda b=batch: desisky_run(model(), train, test, epochs=cfg.epochs, batch=b),
            target))
    return out


def vs_opifex(cfg: Config) -> list[dict]:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    train, test = sine_data(cfg.points)
    model = lambda: eqx.nn.MLP(1, 1, 32, 2, activation=jnp.tanh,  # noqa: E731
                               key=jax.random.key(0))
    return [compare(
        cfg, "opifex_sin3x", cfg.points * cfg.opifex_epochs,
        lambda: ours(model(), train, test, epochs=cfg.opifex_epochs, batch=cfg.opifex_batch,
                     loss="mse"),
        lambda: opifex_run(train, test, epochs=cfg.opifex_epochs, batch=cfg.opifex_batch),
        cfg.target_opifex)]


def run(cfg: Config) -> dict:
    results: dict[str, object] = {}
    runners = {"desisky": vs_desisky, "opifex": vs_opifex}
    for peer in (p for p in cfg.peers.split(",") if p):
        if peer not in runners:
            raise SystemExit(f"error: --peers: unknown peer {peer!r}; known: {sorted(runners)}.")
        reason = installed(peer)
        results[peer] = {"skipped": reason} if reason else runners[peer](cfg)
    measured = [c for v in results.values() if isinstance(v, list) for c in v]
    return {"peers": results, "measured": len(measured),
            "meets_target": bool(measured) and all(c["meets_target"] for c in measured)}


if __name__ == "__main__":
    common.main("vs_peers", Config, QUICK, run)
