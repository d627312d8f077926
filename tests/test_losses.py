import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distributed as L


def _arrays(seed=0, shape=(4, 3, 5)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def test_mse_loss():
    p, t = _arrays()
    np.testing.assert_allclose(L.mse_loss(p, t), np.mean((p - t) ** 2), rtol=1e-6)


def test_masked_mse_excludes_ones():
    p, t = _arrays()
    mask = (np.random.default_rng(1).random(p.shape) < 0.3).astype(np.float32)
    keep = mask == 0
    expected = np.sum(((p - t) ** 2)[keep]) / keep.sum()
    np.testing.assert_allclose(L.masked_mse_loss(p, t, mask), expected, rtol=1e-6)
    # Bool masks are accepted and behave the same.
    np.testing.assert_allclose(L.masked_mse_loss(p, t, mask.astype(bool)), expected, rtol=1e-6)


def test_masked_mse_all_excluded_is_zero_with_finite_grad():
    p, t = _arrays()
    mask = np.ones_like(p)
    assert float(L.masked_mse_loss(p, t, mask)) == 0.0
    g = jax.grad(L.masked_mse_loss)(jnp.asarray(p), t, mask)
    assert np.all(np.asarray(g) == 0.0)


def test_weighted_masked_mse():
    p, t = _arrays()
    mask = (np.random.default_rng(2).random(p.shape) < 0.3).astype(np.float32)
    w = np.array([1.0, 2.0, 0.5, 3.0], np.float32)
    keep = 1 - mask
    sq = (p - t) ** 2
    expected = np.sum(w[:, None, None] * keep * sq) / np.sum(w[:, None, None] * keep)
    np.testing.assert_allclose(L.weighted_masked_mse_loss(p, t, mask, w), expected, rtol=1e-6)
    ones = L.weighted_masked_mse_loss(p, t, mask, np.ones(4, np.float32))
    np.testing.assert_allclose(ones, L.masked_mse_loss(p, t, mask), rtol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        L.weighted_masked_mse_loss(p, t, mask, np.ones(3, np.float32))


def test_l2_opd_regularization():
    opd = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    expected = 1e-2 * np.sum(opd**2) / 2
    np.testing.assert_allclose(L.l2_opd_regularization(opd, 1e-2), expected, rtol=1e-6)


def test_lp_regularization_value_and_grad_at_zero():
    a = np.array([0.0, -2.0, 0.5], np.float32)
    expected = 0.3 * (2.0**1.1 + 0.5**1.1)
    np.testing.assert_allclose(L.lp_regularization(a, 0.3), expected, rtol=1e-6)
    g = np.asarray(jax.grad(L.lp_regularization)(jnp.asarray(a), 0.3))
    assert g[0] == 0.0 and np.all(np.isfinite(g))
    np.testing.assert_allclose(g[1], -0.3 * 1.1 * 2.0**0.1, rtol=1e-5)
    with pytest.raises(ValueError, match="p=0"):
        L.lp_regularization(a, 0.3, p=0)


class _ToyPSF(eqx.Module):
    scale: jax.Array
    alpha_mat: jax.Array

    def __call__(self, positions, seds):
        return self.scale * jnp.ones((positions.shape[0], 2, 2)) * seds[:, None, None]

    def opd(self, positions):
        return self.scale * jnp.ones((positions.shape[0], 3, 3))


def test_total_loss_matches_hand_sum():
    model = _ToyPSF(jnp.array(2.0), jnp.array([[0.5, -1.0]]))
    pos = np.zeros((2, 2), np.float32)
    seds = np.array([1.0, 3.0], np.float32)
    targets = np.zeros((2, 2, 2), np.float32)
    masks = np.zeros((2, 2, 2), np.float32)
    masks[1, 0, 0] = 1.0
    pred = 2.0 * np.ones((2, 2, 2)) * seds[:, None, None]
    data = np.sum(pred**2 * (1 - masks)) / 7
    l2 = 1e-3 * (2.0**2 * 18) / 2
    lp = 0.1 * (0.5**1.1 + 1.0)
    got = L.total_loss(model, pos, seds, targets, masks, l2_param=1e-3, l1_rate=0.1)
    np.testing.assert_allclose(got, data + l2 + lp, rtol=1e-5)
    # With weights: weighted masked MSE.
    w = np.array([1.0, 3.0], np.float32)
    wdata = np.sum(w[:, None, None] * pred**2 * (1 - masks)) / np.sum(
        w[:, None, None] * (1 - masks)
    )
    got = L.total_loss(model, pos, seds, targets, masks, sample_weight=w, l2_param=0.0)
    np.testing.assert_allclose(got, wdata, rtol=1e-5)
    # Traced l1_rate works under jit.
    f = jax.jit(lambda r: L.total_loss(model, pos, seds, targets, masks, l2_param=0.0, l1_rate=r))
    np.testing.assert_allclose(f(0.1), data + lp, rtol=1e-5)


def test_total_loss_without_opd_needs_zero_l2():
    class NoOpd(eqx.Module):
        def __call__(self, pos, seds):
            return jnp.zeros((pos.shape[0], 2, 2))

    z = np.zeros((1, 2, 2), np.float32)
    assert float(L.total_loss(NoOpd(), np.zeros((1, 2)), np.ones(1), z, z, l2_param=0.0)) == 0
    with pytest.raises(TypeError, match="l2_param=0.0"):
        L.total_loss(NoOpd(), np.zeros((1, 2)), np.ones(1), z, z)


def test_l1_schedule_rule():
    assert L.l1_schedule_rule(0, 1e-3) == 1e-3
    assert L.l1_schedule_rule(9, 1e-3) == 1e-3
    assert L.l1_schedule_rule(10, 1e-3) == 5e-4
    assert L.l1_schedule_rule(20, 1e-3) == 2.5e-4
    with pytest.raises(ValueError, match="epoch=-1"):
        L.l1_schedule_rule(-1, 1e-3)


def _noisy_stars(sigmas, size=16, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    star = 100 * np.exp(-((yy - 7.5) ** 2 + (xx - 7.5) ** 2) / 4)
    return np.stack([star + s * rng.normal(size=(size, size)) for s in sigmas]).astype(np.float32)


def test_calculate_sample_weights_hand_estimator():
    stars = _noisy_stars([1.0, 2.0, 4.0])
    assert L.calculate_sample_weights(stars, use_sample_weights=False) is None
    w = L.calculate_sample_weights(stars)
    # Recompute the documented estimator by hand.
    yy, xx = np.mgrid[:16, :16]
    window = np.hypot(yy - 7.5, xx - 7.5) > np.ceil(16 / 3.33)
    sig = []
    for im in stars.astype(np.float64):
        px = im[window]
        sig.append(1.4826 * np.median(np.abs(px - np.median(px))))
    inv = 1 / np.array(sig) ** 2
    np.testing.assert_allclose(w, inv / np.median(inv), rtol=1e-5)
    assert w.shape == (3,) and w[1] == pytest.approx(1.0)
    assert w[0] > w[1] > w[2]  # noisier stars weigh less


def test_calculate_sample_weights_masked_ignores_masked_pixels():
    stars = _noisy_stars([1.0, 1.0])
    masks = np.zeros_like(stars)
    stars[1, 0, :] = 1e4  # hot row, masked out
    masks[1, 0, :] = 1
    w_masked = L.calculate_sample_weights(stars, masked=True, masks=masks)
    w_plain = L.calculate_sample_weights(stars)
    assert abs(np.log(w_masked[1] / w_masked[0])) < abs(np.log(w_plain[1] / w_plain[0]))
    with pytest.raises(ValueError, match="needs `masks`"):
        L.calculate_sample_weights(stars, masked=True)
    with pytest.raises(ValueError, match="images \\[0\\]"):
        L.calculate_sample_weights(np.zeros((1, 16, 16)))


def test_elementwise_registry_losses_and_reductions():
    p, t = _arrays(shape=(4, 3))
    d = p - t
    hub = np.where(np.abs(d) <= 0.5, 0.5 * d**2, 0.5 * (np.abs(d) - 0.25))
    cases = {
        ("mse", ()): d**2,
        ("l2", ()): d**2,
        ("mae", ()): np.abs(d),
        ("huber", (("delta", 0.5),)): hub,
        ("huber", (("huber_delta", 0.5),)): hub,
        ("mape", (("epsilon", 1e-8),)): 100 * np.abs(d) / np.abs(t),
    }
    w = np.array([1.0, 0.0, 2.0, 1.0], np.float32)
    for (name, params), elem in cases.items():
        params = dict(params)
        np.testing.assert_allclose(L.get_loss(name, **params)(p, t), elem.mean(), rtol=1e-5)
        s = L.get_loss(name, reduction="sum", **params)(p, t)
        np.testing.assert_allclose(s, elem.sum(), rtol=1e-5)
        n = L.get_loss(name, reduction="none", **params)(p, t, w)
        np.testing.assert_allclose(n, w[:, None] * elem, rtol=1e-5)
        m = L.get_loss(name, **params)(p, t, w)
        np.testing.assert_allclose(m, np.sum(w[:, None] * elem) / (w.sum() * 3), rtol=1e-5)
    np.testing.assert_allclose(L.huber_loss(p, t, 0.5), hub.mean(), rtol=1e-5)
    np.testing.assert_allclose(L.mae_loss(p, t), np.abs(d).mean(), rtol=1e-6)
    np.testing.assert_allclose(L.mape_loss(p, t), (100 * np.abs(d) / np.abs(t)).mean(), rtol=1e-5)


def test_physics_informed_loss():
    pred = np.array([1.0, 0.9, 0.95, 0.7], np.float32)
    target = np.array([1.0, 0.8, 0.9, 0.75], np.float32)
    mse = np.mean((pred - target) ** 2)
    mono = np.mean(np.maximum(np.diff(pred), 0))  # one increase of 0.05
    smooth = np.mean(np.diff(pred, n=2) ** 2)
    fn = L.get_loss("physics_informed", monotonicity_weight=0.1, smoothness_weight=0.05)
    np.testing.assert_allclose(fn(pred, target), mse + 0.1 * mono + 0.05 * smooth, rtol=1e-5)
    res = L.physics_informed_loss(lambda p, x: p - x, physics_weight=2.0, data_weight=0.5)
    got = res(pred, target, inputs=np.full(4, 0.5, np.float32))
    np.testing.assert_allclose(got, 0.5 * mse + 2.0 * np.mean((pred - 0.5) ** 2), rtol=1e-5)
    with pytest.raises(ValueError, match="smoothness_weight=-1"):
        L.get_loss("physics_informed", smoothness_weight=-1)
    with pytest.raises(ValueError, match="'none'"):
        L.get_loss("physics_informed", reduction="none")


def test_registry_errors_and_registration():
    assert {"mse", "l2", "huber", "mae", "mape", "physics_informed"} <= set(L.list_losses())
    with pytest.raises(ValueError, match="'nope'.*huber"):
        L.get_loss("nope")
    with pytest.raises(TypeError, match="'delt'"):
        L.get_loss("huber", delt=0.5)
    with pytest.raises(ValueError, match="reduction='avg'"):
        L.get_loss("mse", reduction="avg")
    with pytest.raises(ValueError, match="delta=-1"):
        L.get_loss("huber", delta=-1)

    @L.register_loss("test_scaled_mse", overwrite=True)
    class ScaledMSE:
        def __init__(self, alpha=1.0):
            self.alpha = alpha

        def __call__(self, pred, target, weights=None):
            return self.alpha * jnp.mean((pred - target) ** 2)

    p, t = _arrays()
    np.testing.assert_allclose(
        L.get_loss("test_scaled_mse", alpha=3.0)(p, t), 3 * np.mean((p - t) ** 2), rtol=1e-6
    )
    with pytest.raises(ValueError, match="already registered"):
        L.register_loss("mse")(lambda: None)


def test_registry_losses_jit_and_grad():
    p, t = _arrays(shape=(4, 3))
    for name in ("mse", "huber", "mae", "mape", "physics_informed"):
        fn = L.get_loss(name)
        g = jax.jit(jax.grad(fn))(jnp.asarray(p), t)
        assert g.shape == p.shape and np.all(np.isfinite(np.asarray(g)))
