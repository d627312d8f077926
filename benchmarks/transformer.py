"""Transformer LM training throughput: tokens/s, achieved TFLOP/s and MFU.

Trains `distributed.models.TransformerLM` (bf16 compute, float32 parameters and Adam-W state)
with the system's sharded `TrainStep`, assembled by `distributed.engine.build` (the assembly
behind the command line) from an engine `Task` of the model, `lm_loss` and random tokens, on
two batches of those tokens already on the devices, so the figure is the step itself. FLOPs
per token come from `flops_per_token` (6N + attention, the PaLM convention; rematerialisation
not counted). MFU = achieved FLOP/s / (peak x devices), with the dense bf16 peak of the device
from `PEAK_BF16_FLOPS`; on CPU (no meaningful peak) only the achieved FLOP/s is reported and
``mfu`` is null.

    python benchmarks/transformer.py [--quick] [--devices=8] [--size=auto|tiny|small|125m|350m|1b]
        [--mesh=data:-1 | fsdp:-1 | data:-1,tensor:2] [--remat=true] [--batch_per_device=N]

``--size=auto`` picks ``1b`` (~1.0B parameters, sequence 2048, remat) on a GPU/TPU and ``small``
on CPU. Not yet measured on a GPU: the script has no CPU-only assumption, but its GPU figures
are still to be recorded (see benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses
import time

import common

# Dense (no sparsity) bf16 peak FLOP/s per device. Matched against `device.device_kind`,
# lower-cased, first match wins (so "v5 lite" is tested before "v5").
PEAK_BF16_FLOPS: tuple[tuple[str, float, str], ...] = (
    ("h100 pcie", 756e12, "NVIDIA H100 datasheet: PCIe BF16 Tensor Core 1,513 TFLOPS sparse"),
    ("h100", 989e12, "NVIDIA H100 datasheet: SXM BF16 Tensor Core 1,979 TFLOPS sparse / 2"),
    ("h200", 989e12, "NVIDIA H200 datasheet: BF16 Tensor Core 1,979 TFLOPS sparse / 2"),
    ("a100", 312e12, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense"),
    ("tpu v4", 275e12, "Google Cloud TPU v4 docs: 275 TFLOPS bf16 per chip"),
    ("tpu v5 lite", 197e12, "Google Cloud TPU v5e docs: 197 TFLOPS bf16 per chip"),
    ("tpu v5e", 197e12, "Google Cloud TPU v5e docs: 197 TFLOPS bf16 per chip"),
    ("tpu v5p", 459e12, "Google Cloud TPU v5p docs: 459 TFLOPS bf16 per chip"),
    ("tpu v5", 459e12, "Google Cloud TPU v5p docs: 459 TFLOPS bf16 per chip"),
)

# name: (vocab, d_model, n_layers, n_heads, d_ff, seq_len, batch_per_device, remat)
SIZES: dict[str, tuple[int, int, int, int, int, int, int, bool]] = {
    "tiny": (256, 64, 2, 4, 256, 64, 2, False),
    "small": (1024, 256, 4, 4, 1024, 128, 1, False),
    "125m": (50304, 768, 12, 12, 3072, 1024, 16, False),
    "350m": (50304, 1024, 24, 16, 4096, 1024, 8, True),
    "1b": (50304, 2048, 16, 16, 8192, 2048, 8, True),  # ~1.0B parameters; fits an 80 GB GPU
}


@dataclasses.dataclass
class Config:
    size: str = "auto"  # auto: 1b on GPU/TPU, small on CPU
    mesh: str = "data:-1"  # e.g. fsdp:-1 (ZeRO-3 style) or data:-1,tensor:2
    sharding: str = "auto"  # parameter sharding strategy (the CLI's --sharding)
    batch_per_device: int = 0  # 0: the size's default; global batch = this x batch shards
    seq_len: int = 0  # 0: the size's default
    remat: str = "auto"  # auto (the size's default), true, false
    compute_dtype: str = "bfloat16"
    steps: int = 0  # timed steps per repetition (0: 10 on GPU/TPU, 2 on CPU)
    reps: int = 3
    warmup: int = 2  # untimed steps after the compile
    quick: bool = False
    devices: int = 0


QUICK = dict(size="tiny", steps=2, reps=2, warmup=1)


def peak_flops(device_kind: str) -> tuple[float | None, str | None]:
    kind = device_kind.lower()
    for key, flops, source in PEAK_BF16_FLOPS:
        if key in kind:
            return flops, source
    return None, None


def run(cfg: Config) -> dict:
    import jax
    import numpy as np

    from distributed.core import bcd
    from distributed.core.mesh import batch_shard_count, make_mesh
    from distributed.core.optim import OptimizerConfig, make_optimizer
    from distributed.core.step import StepOptions
    from distributed.data import to_global
    from distributed.engine import Task, build
    from distributed.models import TransformerLM, flops_per_token, lm_loss

    platform = jax.default_backend()
    size = cfg.size if cfg.size != "auto" else ("small" if platform == "cpu" else "1b")
    if size not in SIZES:
        raise SystemExit(f"error: --size={size!r}; choose auto or one of {list(SIZES)}.")
    vocab, d, layers, heads, d_ff, seq, bpd, remat = SIZES[size]
    seq = cfg.seq_len or seq
    bpd = cfg.batch_per_device or bpd
    remat = remat if cfg.remat == "auto" else cfg.remat.lower() in ("1", "true", "yes")
    steps = cfg.steps or (2 if platform == "cpu" else 10)

    mesh = make_mesh(cfg.mesh)
    batch = bpd * batch_shard_count(mesh)
    arch = dict(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, d_ff=d_ff,
                max_len=seq, remat=remat, compute_dtype=cfg.compute_dtype)
    tokens = np.random.default_rng(0).integers(0, vocab, (2 * batch, seq + 1), dtype=np.int32)
    task = Task(model=lambda: TransformerLM(**arch, key=jax.random.key(0)), loss_fn=lm_loss,
                train={"tokens": tokens}, plan=bcd.single_phase_plan(1),
                optimizers={"all": make_optimizer(OptimizerConfig(
                    name="adamw", learning_rate=3e-4, weight_decay=0.1))})
    t0 = time.perf_counter()
    engine = build(task, mesh=mesh, batch_size=batch, seed=0, key=jax.random.key(1),
                   options=StepOptions(), strategy=cfg.sharding, with_data=False)
    state, step = engine.state, engine.train_step
    common.block(state)
    init_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(state.model) if hasattr(x, "size"))
    batches = [to_global({"tokens": tokens[i * batch:(i + 1) * batch]}, mesh) for i in range(2)]
    active = engine.plan[0].blocks  # ("all",): every parameter

    t0 = time.perf_counter()
    state, metrics = step(state, batches[0], active)
    first_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    for i in range(cfg.warmup):
        state, metrics = step(state, batches[i % 2], active)
    common.block(metrics)

    times = []
    for _ in range(cfg.reps):
        t0, prev = time.perf_counter(), None
        for i in range(steps):
            state, metrics = step(state, batches[i % 2], active)
            if prev is not None:  # one step queued ahead: wait for the previous step's loss
                prev.block_until_ready()
            prev = metrics["loss"]
        common.block((state, metrics))
        times.append((time.perf_counter() - t0) / steps)

    tokens_per_step = batch * seq
    fpt = flops_per_token(arch, seq)
    step_s = common.summarize(times)
    tok_s = tokens_per_step / step_s["median"]
    achieved = fpt * tok_s
    kind = jax.devices()[0].device_kind
    peak, source = (None, None) if platform == "cpu" else peak_flops(kind)
    n_dev = mesh.size
    mem = None
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats:
        mem = {"peak_bytes_in_use": stats.get("peak_bytes_in_use"),
               "bytes_limit": stats.get("bytes_limit")}
    return {
        "size": size, "arch": arch, "params": int(n_params), "mesh": dict(mesh.shape),
        "sharding": cfg.sharding, "global_batch": batch, "seq_len": seq,
        "tokens_per_step": tokens_per_step, "flops_per_token": fpt,
        "init_s": round(init_s, 3), "first_step_s": round(compile_s, 3),
        "first_loss": first_loss, "last_loss": float(metrics["loss"]),
        "step_s": step_s, "tokens_per_s": round(tok_s, 1),
        "tokens_per_s_per_device": round(tok_s / n_dev, 1),
        "achieved_tflops": round(achieved / 1e12, 4),
        "achieved_tflops_per_device": round(achieved / n_dev / 1e12, 4),
        "peak_tflops_per_device": None if peak is None else peak / 1e12,
        "peak_source": source,
        "mfu": None if peak is None else round(achieved / (peak * n_dev), 4),
        "memory": mem,
    }


if __name__ == "__main__":
    common.main("transformer", Config, QUICK, run)
