import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distributed.core.optim import (
    OptimizerConfig,
    configure_optimizer,
    current_learning_rate,
    make_optimizer,
    make_schedule,
    per_block_optimizers,
    warm_restarts_schedule,
)


def _at(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def test_constant_and_warmup():
    s = make_schedule(OptimizerConfig(learning_rate=0.1))
    np.testing.assert_allclose(_at(s, [0, 5, 1000]), [0.1, 0.1, 0.1], rtol=1e-6)
    s = make_schedule(OptimizerConfig(learning_rate=0.1, warmup_steps=4))
    np.testing.assert_allclose(_at(s, [0, 1, 2, 4, 100]), [0.0, 0.025, 0.05, 0.1, 0.1], rtol=1e-6)


def test_cosine_schedule():
    s = make_schedule(OptimizerConfig(learning_rate=1.0, schedule="cosine", total_steps=100))
    c = lambda t: 0.5 * (1 + math.cos(math.pi * t / 100))  # noqa: E731
    np.testing.assert_allclose(_at(s, [0, 25, 50, 100, 200]), [1, c(25), 0.5, 0, 0], atol=1e-6)
    # Warmup 10, then cosine over the remaining 90 steps down to alpha * lr.
    cfg = OptimizerConfig(
        learning_rate=2.0, schedule="cosine", total_steps=100, warmup_steps=10, alpha=0.1
    )
    s = make_schedule(cfg)
    mid = 0.2 + (2.0 - 0.2) * 0.5  # halfway through the decay: t = 10 + 45
    np.testing.assert_allclose(_at(s, [5, 10, 55, 100]), [1.0, 2.0, mid, 0.2], rtol=1e-5)


def test_exponential_and_linear_schedules():
    cfg = OptimizerConfig(
        learning_rate=1.0, schedule="exponential", decay_rate=0.5, transition_steps=10
    )
    np.testing.assert_allclose(
        _at(make_schedule(cfg), [0, 10, 15, 30]), [1.0, 0.5, 0.5**1.5, 0.125], rtol=1e-5
    )
    floor = dataclasses.replace(cfg, alpha=0.2)
    np.testing.assert_allclose(_at(make_schedule(floor), [30]), [0.2], rtol=1e-6)
    cfg = OptimizerConfig(learning_rate=1.0, schedule="linear", total_steps=10, alpha=0.5)
    np.testing.assert_allclose(
        _at(make_schedule(cfg), [0, 4, 10, 20]), [1.0, 0.8, 0.5, 0.5], rtol=1e-6
    )


def test_cosine_warm_restarts_boundaries():
    cfg = OptimizerConfig(learning_rate=1.0, schedule="cosine_warm_restarts", T0=10)
    s = make_schedule(cfg)
    # Periods: [0, 10), [10, 30), [30, 70), ...
    got = _at(s, [0, 5, 9, 10, 20, 29, 30, 50, 70])
    c = lambda t, T: 0.5 * (1 + math.cos(math.pi * t / T))  # noqa: E731
    want = [1.0, 0.5, c(9, 10), 1.0, 0.5, c(19, 20), 1.0, 0.5, 1.0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    # T_mult = 1: fixed period; exact boundaries restart; jit-compatible.
    s1 = jax.jit(warm_restarts_schedule(2.0, 4, T_mult=1, end_value=1.0))
    np.testing.assert_allclose(_at(s1, [0, 2, 4, 6, 8]), [2.0, 1.5, 2.0, 1.5, 2.0], atol=1e-6)
    # Many boundaries of T_mult=3 land exactly on restarts despite the float log.
    s3 = warm_restarts_schedule(1.0, 5, T_mult=3)
    starts = [5 * (3**k - 1) // 2 for k in range(8)]
    np.testing.assert_allclose(_at(s3, starts), np.ones(len(starts)), atol=1e-6)
    ends = [c(5 * 3**k - 1, 5 * 3**k) for k in range(7)]  # last step of each period
    np.testing.assert_allclose(_at(s3, [s - 1 for s in starts[1:]]), ends, atol=1e-5)


def test_configure_optimizer_one_adam_step_matches_formula():
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-7
    tx = configure_optimizer(lr, b1, b2, eps)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    g = np.array([0.1, -0.02, 1e-6], np.float32)
    state = tx.init(params)
    upd, state = tx.update({"w": jnp.asarray(g)}, state, params)
    m_hat = (1 - b1) * g / (1 - b1)
    v_hat = (1 - b2) * g**2 / (1 - b2)
    np.testing.assert_allclose(upd["w"], -lr * m_hat / (np.sqrt(v_hat) + eps), rtol=1e-5)
    # Same numbers as plain optax.adam, and the lr is readable.
    ref, _ = optax.adam(lr, b1, b2, eps).update(
        {"w": jnp.asarray(g)}, optax.adam(lr, b1, b2, eps).init(params), params
    )
    np.testing.assert_array_equal(upd["w"], ref["w"])
    assert float(current_learning_rate(state)) == pytest.approx(lr)


def test_make_optimizer_adam_matches_configure_and_tracks_lr():
    cfg = OptimizerConfig(learning_rate=0.1, schedule="cosine", total_steps=4)
    tx = make_optimizer(cfg)
    params = jnp.ones(3)
    state = tx.init(params)
    assert float(current_learning_rate(state)) == pytest.approx(0.1)
    lrs = []
    for _ in range(3):
        _, state = jax.jit(tx.update)(jnp.ones(3), state, params)
        lrs.append(float(current_learning_rate(state)))
    # After update k (0-based) the state holds the lr used for update k.
    np.testing.assert_allclose(lrs, [0.1, 0.1 * 0.5 * (1 + math.cos(math.pi / 4)), 0.05], rtol=1e-5)
    assert current_learning_rate(optax.adam(0.1).init(params)) is None


def test_global_norm_clipping_then_sgd():
    cfg = OptimizerConfig(name="sgd", learning_rate=1.0, grad_clip_norm=1.0)
    tx = make_optimizer(cfg)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # global norm 5
    upd, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(upd["a"], [-0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(upd["b"], [-0.8], rtol=1e-6)
    small = {"a": jnp.array([0.3, 0.0]), "b": jnp.array([0.4])}  # norm 0.5: untouched
    upd, _ = tx.update(small, tx.init(params), params)
    np.testing.assert_allclose(upd["b"], [-0.4], rtol=1e-6)


def test_value_clipping_and_weight_decay():
    tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=0.5, grad_clip_value=1.0))
    p = jnp.zeros(3)
    upd, _ = tx.update(jnp.array([-3.0, 0.2, 7.0]), tx.init(p), p)
    np.testing.assert_allclose(upd, [0.5, -0.1, -0.5], rtol=1e-6)
    # SGD + coupled L2: update = -lr * (g + wd * p).
    tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=0.5, weight_decay=0.1))
    p = jnp.array([2.0])
    upd, _ = tx.update(jnp.array([1.0]), tx.init(p), p)
    np.testing.assert_allclose(upd, [-0.5 * (1.0 + 0.2)], rtol=1e-6)
    # AdamW: decoupled decay, first step = -lr * (sign(g) + wd * p) (up to eps).
    tx = make_optimizer(OptimizerConfig(name="adamw", learning_rate=0.5, weight_decay=0.1))
    upd, _ = tx.update(jnp.array([1.0]), tx.init(p), p)
    np.testing.assert_allclose(upd, [-0.5 * (1.0 + 0.2)], rtol=1e-5)


def test_sgd_momentum_second_step():
    tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.9))
    p = jnp.zeros(1)
    s = tx.init(p)
    _, s = tx.update(jnp.array([1.0]), s, p)
    upd, _ = tx.update(jnp.array([1.0]), s, p)
    np.testing.assert_allclose(upd, [-0.1 * 1.9], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="rmsprop"), "'rmsprop'"),
        (dict(schedule="step"), "'step'"),
        (dict(learning_rate=-1.0), "learning_rate=-1.0"),
        (dict(b1=1.0), "b1=1.0"),
        (dict(eps=0.0), "eps=0.0"),
        (dict(weight_decay=-0.1), "weight_decay=-0.1"),
        (dict(grad_clip_norm=-1.0), "grad_clip_norm=-1.0"),
        (dict(schedule="cosine"), "total_steps"),
        (dict(schedule="cosine", total_steps=10, warmup_steps=10), "total_steps=10"),
        (dict(schedule="cosine_warm_restarts"), "T0"),
        (dict(schedule="cosine_warm_restarts", T0=0), "T0=0"),
        (dict(T_mult=0), "T_mult=0"),
        (dict(alpha=1.5), "alpha=1.5"),
        (dict(warmup_steps=2.5), "warmup_steps=2.5"),
    ],
)
def test_bad_config_raises_with_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)


def test_off_clipping_values_accepted():
    for v in (None, 0, 0.0):
        make_optimizer(OptimizerConfig(grad_clip_norm=v, grad_clip_value=v))
    with pytest.raises(TypeError, match="OptimizerConfig"):
        make_optimizer({"name": "adam"})


def test_per_block_optimizers():
    base = OptimizerConfig(
        name="sgd", learning_rate=1.0, schedule="cosine", total_steps=10, alpha=0.1
    )
    txs = per_block_optimizers({"param": 0.01, "nonparam": 0.1}, base)
    assert set(txs) == {"param", "nonparam"}
    p = jnp.zeros(1)
    for name, lr in (("param", 0.01), ("nonparam", 0.1)):
        upd, s = txs[name].update(jnp.array([1.0]), txs[name].init(p), p)
        np.testing.assert_allclose(upd, [-lr], rtol=1e-6)
        assert float(current_learning_rate(s)) == pytest.approx(lr)
    with pytest.raises(ValueError, match="'param'.*learning_rate=-1"):
        per_block_optimizers({"param": -1}, base)
    with pytest.raises(TypeError, match="non-empty dict"):
        per_block_optimizers({}, base)
