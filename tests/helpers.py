"""Small models and tree comparisons shared by the tests."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


class TinyMLP(eqx.Module):
    """Batched MLP with `layers[i].weight` of shape (out, in) (tensor rules apply)."""

    layers: tuple

    def __init__(self, sizes=(8, 32, 32, 4), *, key):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=False)
        )

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = x @ layer.weight.T + layer.bias
            if i < len(self.layers) - 1:
                x = jnp.tanh(x)
        return x


class SemiParam(eqx.Module):
    """A two-block semi-parametric regressor: a polynomial part plus learned features.

    y = poly(x) @ coeff_mat + (tanh(x @ S_mat) * alpha_mat) summed over features.
    `basis_scale` is a fixed (non-trainable) array that BCD must never touch.
    """

    coeff_mat: jax.Array
    S_mat: jax.Array
    alpha_mat: jax.Array
    basis_scale: jax.Array
    param_fields = ("coeff_mat",)
    nonparam_fields = ("S_mat", "alpha_mat")

    def __init__(self, n_in=4, n_feat=16, n_out=2, *, key):
        k1, k2 = jax.random.split(key)
        self.coeff_mat = 0.1 * jax.random.normal(k1, (2 * n_in + 1, n_out))
        self.S_mat = 0.5 * jax.random.normal(k2, (n_in, n_feat))
        self.alpha_mat = jnp.ones((n_feat, n_out)) / n_feat
        self.basis_scale = jnp.linspace(0.5, 1.5, n_in)

    def features(self, x):
        x = x * self.basis_scale
        return jnp.concatenate([jnp.ones((x.shape[0], 1)), x, x**2], axis=1)

    def __call__(self, x):
        return self.features(x) @ self.coeff_mat + jnp.tanh(x @ self.S_mat) @ self.alpha_mat

    def set_alpha_zero(self):
        return eqx.tree_at(lambda m: m.alpha_mat, self, jnp.zeros_like(self.alpha_mat))

    def set_alpha_identity(self):
        n_feat, n_out = self.alpha_mat.shape
        return eqx.tree_at(lambda m: m.alpha_mat, self, jnp.ones((n_feat, n_out)) / n_feat)


def regression_data(n=64, n_in=4, n_out=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_in)).astype(np.float32)
    w = rng.normal(size=(n_in, n_out)).astype(np.float32)
    y = (np.sin(x) @ w + 0.1 * x[:, :n_out] ** 2).astype(np.float32)
    return {"x": x, "y": y}


def mse(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def arrays(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def assert_trees_allclose(a, b, rtol=1e-5, atol=1e-6):
    la, lb = arrays(a), arrays(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=False):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def assert_trees_equal(a, b):
    la, lb = arrays(a), arrays(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=False):
        np.testing.assert_array_equal(x, y)
