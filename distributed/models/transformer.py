"""A small decoder-only transformer language model, for throughput benchmarks.

Pre-norm blocks (RMSNorm → causal multi-head attention → residual; RMSNorm → GELU MLP →
residual), learned absolute position embeddings and a separate (untied) output projection. The
per-layer weights are stacked along a leading layer axis and run with `jax.lax.scan`, so compile
time does not grow with depth; `remat=True` wraps each layer in `jax.checkpoint`.

Parameters are stored in float32; the forward pass casts them to `compute_dtype` (bfloat16 by
default). Norm statistics, logits and the loss are computed in float32.
"""

import functools
import itertools
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


class TransformerBlocks(eqx.Module):
    """The weights of all layers, stacked along a leading axis of size `n_layers`."""

    attn_norm: Array
    wq: Array
    wk: Array
    wv: Array
    wo: Array
    mlp_norm: Array
    w_in: Array
    w_out: Array


def _rms_norm(x: Array, scale: Array, eps: float = 1e-6) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _layer(x: Array, p: TransformerBlocks) -> Array:
    """One pre-norm transformer layer on activations `x` (B, L, d_model) in the compute dtype."""
    cd = x.dtype
    h = _rms_norm(x, p.attn_norm)
    q, k, v = (jnp.einsum("bld,dnh->blnh", h, w.astype(cd)) for w in (p.wq, p.wk, p.wv))
    attn = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=None)
    x = x + jnp.einsum("blnh,nhd->bld", attn, p.wo.astype(cd))
    h = _rms_norm(x, p.mlp_norm)
    return x + jax.nn.gelu(h @ p.w_in.astype(cd)) @ p.w_out.astype(cd)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _init_arrays(key, vocab_size, d_model, n_layers, n_heads, d_ff, max_len):
    """All initial weights from ONE normal draw: each threefry call costs seconds of XLA CPU
    compile time, so drawing per array would make building the model slow."""
    hd, std = d_model // n_heads, 0.02
    out_std = std / (2 * n_layers) ** 0.5  # GPT-2 style scaling of residual projections
    shapes = dict(
        embed=(vocab_size, d_model), pos_embed=(max_len, d_model),
        wq=(n_layers, d_model, n_heads, hd), wk=(n_layers, d_model, n_heads, hd),
        wv=(n_layers, d_model, n_heads, hd), wo=(n_layers, n_heads, hd, d_model),
        w_in=(n_layers, d_model, d_ff), w_out=(n_layers, d_ff, d_model),
        unembed=(d_model, vocab_size),
    )
    sizes = [math.prod(v) for v in shapes.values()]
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    parts = jnp.split(flat, list(itertools.accumulate(sizes))[:-1])
    w = {k: p.reshape(v) * (out_std if k in ("wo", "w_out") else std)
         for (k, v), p in zip(shapes.items(), parts, strict=True)}
    blocks = {k: w.pop(k) for k in ("wq", "wk", "wv", "wo", "w_in", "w_out")}
    blocks.update(attn_norm=jnp.ones((n_layers, d_model)), mlp_norm=jnp.ones((n_layers, d_model)))
    return dict(**w, blocks=blocks, final_norm=jnp.ones((d_model,)))


def _positive_int(name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={v!r}.")
    return v


class TransformerLM(eqx.Module):
    """Decoder-only transformer LM: `tokens (B, L) int32 -> logits (B, L, vocab_size) float32`.

    **Arguments** (all keyword-only):

    - `vocab_size`, `d_model`, `n_layers`, `n_heads`, `d_ff`: the usual sizes; `d_model` must be
      divisible by `n_heads` (head_dim = d_model // n_heads).
    - `max_len`: longest sequence (size of the position table).
    - `key`: PRNG key.
    - `remat`: recompute each layer's activations in the backward pass (`jax.checkpoint`).
    - `compute_dtype`: "bfloat16" (default), "float16" or "float32".
    """

    embed: Array
    pos_embed: Array
    blocks: TransformerBlocks
    final_norm: Array
    unembed: Array
    vocab_size: int = eqx.field(static=True)
    d_model: int = eqx.field(static=True)
    n_layers: int = eqx.field(static=True)
    n_heads: int = eqx.field(static=True)
    d_ff: int = eqx.field(static=True)
    max_len: int = eqx.field(static=True)
    remat: bool = eqx.field(static=True)
    compute_dtype: str = eqx.field(static=True)

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        max_len: int,
        key: PRNGKeyArray,
        remat: bool = False,
        compute_dtype: str = "bfloat16",
    ):
        for name, v in (("vocab_size", vocab_size), ("d_model", d_model),
                        ("n_layers", n_layers), ("n_heads", n_heads), ("d_ff", d_ff),
                        ("max_len", max_len)):
            _positive_int(name, v)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}; "
                             f"pick n_heads among the divisors of d_model.")
        if compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={compute_dtype!r} is not supported; use one of "
                             f"{_COMPUTE_DTYPES}.")
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.n_heads, self.d_ff, self.max_len = n_heads, d_ff, max_len
        self.remat, self.compute_dtype = bool(remat), compute_dtype

        arrays = _init_arrays(key, vocab_size, d_model, n_layers, n_heads, d_ff, max_len)
        self.embed, self.pos_embed = arrays["embed"], arrays["pos_embed"]
        self.blocks = TransformerBlocks(**arrays["blocks"])
        self.final_norm, self.unembed = arrays["final_norm"], arrays["unembed"]

    def __call__(self, tokens: Array) -> Array:
        """Next-token logits (float32) for every position of a batch of token sequences."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array (batch, length), got "
                             f"{tokens.dtype} {tokens.shape}.")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len={self.max_len}; "
                             f"build the model with a larger max_len or shorten the batch.")
        cd = jnp.dtype(self.compute_dtype)
        x = jnp.take(self.embed, tokens, axis=0) + self.pos_embed[: tokens.shape[1]]
        layer = jax.checkpoint(_layer) if self.remat else _layer
        x, _ = jax.lax.scan(lambda h, p: (layer(h, p), None), x.astype(cd), self.blocks)
        x = _rms_norm(x, self.final_norm)
        return jnp.einsum("bld,dv->blv", x, self.unembed.astype(cd),
                          preferred_element_type=jnp.float32)

    def arch(self) -> dict[str, Any]:
        """JSON-able constructor keyword arguments (`build_model` rebuilds the model from them)."""
        return {"vocab_size": self.vocab_size, "d_model": self.d_model,
                "n_layers": self.n_layers, "n_heads": self.n_heads, "d_ff": self.d_ff,
                "max_len": self.max_len, "remat": self.remat,
                "compute_dtype": self.compute_dtype}


def lm_loss(model: TransformerLM, batch: dict[str, Array], *, key: Any = None) -> Array:
    """Mean next-token cross-entropy (float32) of `batch["tokens"]` (B, L + 1) int32.

    The model reads tokens[:, :-1] and is scored on tokens[:, 1:]. `key` is accepted (and
    unused) so the function fits `loss_fn(model, batch, *, key)` signatures.
    """
    del key
    tokens = batch["tokens"]
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"batch['tokens'] must be (batch, length + 1) with length >= 1, "
                         f"got shape {tokens.shape}.")
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(nll)


def flops_per_token(model_config: "TransformerLM | dict[str, Any]",
                    seq_len: int | None = None) -> float:
    """Approximate training FLOPs per token (forward + backward), the MFU convention.

    `6 * N + 12 * n_layers * d_model * seq_len`, where N counts the matmul weights (attention
    4 d^2, MLP 2 d d_ff per layer, plus the d * vocab output projection; the embedding lookup,
    positions and norms are excluded) and the second term is the attention scores and their
    application over the full (not causally halved) L x L matrix, as in PaLM's appendix B.
    Rematerialisation is not counted (it adds hardware FLOPs, not model FLOPs).

    Args:
        model_config: a `TransformerLM` or its `arch()` dict.
        seq_len: sequence length L; defaults to `max_len`.
    """
    cfg = model_config.arch() if isinstance(model_config, TransformerLM) else model_config
    d, n_layers = cfg["d_model"], cfg["n_layers"]
    seq_len = cfg["max_len"] if seq_len is None else seq_len
    n_matmul = n_layers * (4 * d * d + 2 * d * cfg["d_ff"]) + d * cfg["vocab_size"]
    return float(6 * n_matmul + 12 * n_layers * d * seq_len)
