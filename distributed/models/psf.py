"""A miniature WaveDiff semi-parametric PSF field model.

The wavefront error (optical path difference, OPD, in micrometres) on a `n_pupil x n_pupil`
pupil grid is the sum of

- a **parametric** part: Noll-ordered Zernike polynomials whose coefficients are polynomials of
  degree `d_max` in the normalised star position (x, y): `coeff_mat @ monomials(x, y)`;
- a **non-parametric** part: learned OPD maps `S_mat` mixed by `alpha_mat` from position
  monomials of degree `d_max_nonparam`: `sum_f (alpha_mat @ monomials(x, y))_f S_mat[f]`, with
  the maps low-passed to the spatial frequencies the cropped PSF can observe (see `features`).

The PSF at wavelength `lam` is `|DFT(pupil * exp(2i pi OPD / lam))|^2` on a grid zero-padded by
`pad_factor`, cropped to `n_pix x n_pix` around the zero frequency and normalised; the
polychromatic PSF mixes the monochromatic ones with the star's SED weights.

Simplification: every wavelength uses the same focal-plane grid (the PSF does not grow with
`lam`); only the phase `2 pi OPD / lam` is chromatic.
"""

import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray


def noll_to_nm(j: int) -> tuple[int, int]:
    """Noll index `j >= 1` → (radial order n, signed azimuthal order m; m < 0 means sin)."""
    if j < 1:
        raise ValueError(f"Noll index must be >= 1, got j={j}.")
    n = (math.isqrt(8 * (j - 1) + 1) - 1) // 2
    p = j - n * (n + 1) // 2
    m = 2 * ((p + n % 2) // 2) - n % 2
    return n, (m if j % 2 == 0 or m == 0 else -m)


def pupil_coords(n_grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Pupil-plane (rho, theta) on an `n_grid` grid whose unit disk touches the grid edges."""
    c = (np.arange(n_grid) - (n_grid - 1) / 2) / (n_grid / 2)
    y, x = np.meshgrid(c, c, indexing="ij")
    return np.hypot(x, y), np.arctan2(y, x)


def zernike_basis(n_modes: int, n_grid: int) -> np.ndarray:
    """The first `n_modes` Noll Zernikes (RMS 1 on the unit disk), zero outside. (n_modes, G, G)."""
    rho, theta = pupil_coords(n_grid)
    out = np.zeros((n_modes, n_grid, n_grid))
    for i in range(n_modes):
        n, m = noll_to_nm(i + 1)
        ma = abs(m)
        radial = sum(
            (-1) ** s * math.factorial(n - s)
            / (math.factorial(s) * math.factorial((n + ma) // 2 - s)
               * math.factorial((n - ma) // 2 - s))
            * rho ** (n - 2 * s)
            for s in range((n - ma) // 2 + 1)
        )
        if m == 0:
            out[i] = math.sqrt(n + 1) * radial
        else:
            trig = np.cos(ma * theta) if m > 0 else np.sin(ma * theta)
            out[i] = math.sqrt(2 * (n + 1)) * radial * trig
    return np.where(rho <= 1.0, out, 0.0).astype(np.float32)


def pupil_mask(n_grid: int, obscuration: float, spiders: int, spider_width: float) -> np.ndarray:
    """Binary pupil (G, G): unit disk minus a central obscuration and `spiders` radial vanes
    at 90 + k * 360 / spiders degrees, `spider_width` wide (radius units, both in [0, 1)).

    Through a centro-symmetric pupil an OPD `W(r)` and its twin `-W(-r)` give identical PSFs
    (the twin-image ambiguity of phase retrieval), and in-focus phase retrieval has many local
    minima. An odd number of wide vanes makes the pupil asymmetric, which ties the PSF to the
    whole OPD, not just its odd part (the idea of asymmetric-pupil wavefront sensing): with the
    defaults (3 vanes, 0.2 wide) training converges to the true OPD from almost every start,
    while thin vanes (0.06) or none leave the twin and mixed local minima about as deep.
    """
    rho, theta = pupil_coords(n_grid)
    mask = (rho <= 1.0) & (rho >= obscuration)
    x, y = rho * np.cos(theta), rho * np.sin(theta)
    for k in range(spiders):
        ang = np.pi / 2 + 2 * np.pi * k / spiders
        along = x * np.cos(ang) + y * np.sin(ang)
        across = -x * np.sin(ang) + y * np.cos(ang)
        mask &= ~((along > 0) & (np.abs(across) < spider_width / 2))
    return mask.astype(np.float32)


def n_monomials(degree: int) -> int:
    """Number of monomials x^i y^j with i + j <= degree."""
    return (degree + 1) * (degree + 2) // 2


def position_monomials(xy_norm, degree: int, xp=jnp):
    """Monomials x^(d-j) y^j, d = 0..degree, of normalised positions (B, 2) → (B, n_monomials)."""
    x, y = xy_norm[:, 0], xy_norm[:, 1]
    cols = [x ** (d - j) * y**j for d in range(degree + 1) for j in range(d + 1)]
    return xp.stack(cols, axis=-1)


@functools.lru_cache(maxsize=16)
def bandlimit_matrix(n_grid: int, cutoff: float, flat: float = 0.7) -> np.ndarray:
    """(G, G) matrix M such that `M @ S @ M.T` low-passes a map S to spatial frequencies below
    `cutoff` (cycles per grid width), flat up to `flat * cutoff` with a cosine taper after.

    A separable filter matches the square PSF crop: an OPD ripple of `f` cycles per pupil
    diameter lands `f * pad_factor` pixels from the PSF centre, so a crop of `n_pix` pixels sees
    `|f_x|, |f_y| <= n_pix / (2 pad_factor)`; content beyond that cannot be learned from it.
    """
    n_fft = 2 * n_grid  # zero padding: a linear (not circular) convolution on the grid
    f = np.abs(np.fft.fftfreq(n_fft) * n_grid)
    r = np.clip((f / cutoff - flat) / (1.0 - flat), 0.0, 1.0)
    kernel = np.real(np.fft.ifft(0.5 * (1.0 + np.cos(np.pi * r))))
    lags = np.arange(n_grid)[:, None] - np.arange(n_grid)[None, :]
    return kernel[lags % n_fft].astype(np.float32)


def _crop_centre(a, n_pix: int, axis: int):
    """Keep DFT bins -n_pix//2 .. n_pix - n_pix//2 - 1 (zero frequency ends up at n_pix//2)."""
    size, h = a.shape[axis], n_pix // 2
    hi = jax.lax.slice_in_dim(a, size - h, size, axis=axis)
    lo = jax.lax.slice_in_dim(a, 0, n_pix - h, axis=axis)
    return jnp.concatenate([hi, lo], axis=axis)


def polychromatic_psf(
    opd: Array,
    seds: Array,
    pupil: Array,
    lambdas: Sequence[float],
    pad_factor: int,
    n_pix: int,
) -> Array:
    """Polychromatic PSFs from OPD maps, in float32, each normalised to sum 1.

    A pruned 2-D FFT: the zero-padded transform runs along x on the G non-zero rows only, is
    cropped to `n_pix` columns, then runs along y and is cropped again — the same numbers as
    `fft2` on the padded `(P, P)` field at about (G + n_pix) / (2P) of the cost.
    """
    opd = opd.astype(jnp.float32)
    pupil = pupil.astype(jnp.float32)
    n_pad = pad_factor * opd.shape[-1]
    wavenumber = jnp.asarray([2 * np.pi / lam for lam in lambdas], jnp.float32)
    phase = opd[:, None] * wavenumber[None, :, None, None]  # (B, L, G, G)
    field = jax.lax.complex(pupil * jnp.cos(phase), pupil * jnp.sin(phase))
    amp = _crop_centre(jnp.fft.fft(field, n=n_pad, axis=-1), n_pix, axis=-1)
    amp = _crop_centre(jnp.fft.fft(amp, n=n_pad, axis=-2), n_pix, axis=-2)
    mono = jnp.real(amp) ** 2 + jnp.imag(amp) ** 2  # (B, L, n_pix, n_pix)
    mono = mono / jnp.sum(mono, axis=(-2, -1), keepdims=True)
    psf = jnp.einsum("bl,blij->bij", seds.astype(jnp.float32), mono)
    return psf / jnp.sum(psf, axis=(-2, -1), keepdims=True)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_arrays(key, coeff_shape, s_shape, pupil):
    """Initial `coeff_mat` (std 5 nm) and `S_mat` (std 1 nm, zero off the pupil) from ONE normal
    draw (each threefry call costs seconds of XLA CPU compile time)."""
    n_coeff = math.prod(coeff_shape)
    flat = jax.random.normal(key, (n_coeff + math.prod(s_shape),), jnp.float32)
    return (0.005 * flat[:n_coeff].reshape(coeff_shape),
            1e-3 * flat[n_coeff:].reshape(s_shape) * pupil)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


class PSFFieldModel(eqx.Module):
    """Semi-parametric PSF field model (a miniature of WaveDiff's polynomial PSF model).

    Trainable blocks: `coeff_mat` (parametric), `S_mat` and `alpha_mat` (non-parametric), named
    by `param_fields` / `nonparam_fields` for block coordinate descent. `zernike_basis` and
    `pupil` are fixed arrays: they are in neither block, and gradients are stopped through them.

    **Arguments** (all keyword-only):

    - `key`: PRNG key for the initial `coeff_mat` and `S_mat`.
    - `n_pupil`: pupil grid size G. `pad_factor`: DFT grid is `pad_factor * G` (2 = Nyquist).
    - `n_pix`: side of the output PSF image, at most `pad_factor * G`.
    - `n_zernikes`: Noll Zernike modes of the parametric part (piston included).
    - `d_max`: polynomial degree of the parametric position dependence.
    - `n_features`: number of non-parametric OPD maps `S_mat`.
    - `d_max_nonparam`: polynomial degree of the non-parametric position dependence.
    - `lambdas`: wavelengths in micrometres (OPD is in micrometres too).
    - `x_lims`, `y_lims`: field extent; positions are mapped to [-1, 1] for the polynomials.
    - `obscuration`: central obscuration radius as a fraction of the pupil radius.
    - `spiders`, `spider_width`: spider vanes across the pupil, their width in radius units;
      the default asymmetric pupil keeps phase retrieval well posed (see `pupil_mask`).

    Shapes: positions (B, 2), seds (B, n_lambda), PSFs (B, n_pix, n_pix), OPDs (B, G, G).
    """

    coeff_mat: Array
    S_mat: Array
    alpha_mat: Array
    zernike_basis: Array
    pupil: Array
    n_pupil: int = eqx.field(static=True)
    pad_factor: int = eqx.field(static=True)
    n_pix: int = eqx.field(static=True)
    n_zernikes: int = eqx.field(static=True)
    d_max: int = eqx.field(static=True)
    n_features: int = eqx.field(static=True)
    d_max_nonparam: int = eqx.field(static=True)
    lambdas: tuple[float, ...] = eqx.field(static=True)
    x_lims: tuple[float, float] = eqx.field(static=True)
    y_lims: tuple[float, float] = eqx.field(static=True)
    obscuration: float = eqx.field(static=True)
    spiders: int = eqx.field(static=True)
    spider_width: float = eqx.field(static=True)

    param_fields: ClassVar[tuple[str, ...]] = ("coeff_mat",)
    nonparam_fields: ClassVar[tuple[str, ...]] = ("S_mat", "alpha_mat")

    def __init__(
        self,
        *,
        key: PRNGKeyArray,
        n_pupil: int = 32,
        pad_factor: int = 2,
        n_pix: int = 24,
        n_zernikes: int = 15,
        d_max: int = 2,
        n_features: int = 10,
        d_max_nonparam: int = 3,
        lambdas: Sequence[float] = (0.55, 0.70, 0.85),
        x_lims: Sequence[float] = (0.0, 1000.0),
        y_lims: Sequence[float] = (0.0, 1000.0),
        obscuration: float = 0.3,
        spiders: int = 3,
        spider_width: float = 0.2,
    ):
        for name, v, lo in (("n_pupil", n_pupil, 8), ("pad_factor", pad_factor, 1),
                            ("n_pix", n_pix, 1), ("n_zernikes", n_zernikes, 1), ("d_max", d_max, 0),
                            ("n_features", n_features, 1), ("d_max_nonparam", d_max_nonparam, 0),
                            ("spiders", spiders, 0)):
            _check(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= lo,
                   f"{name} must be an integer >= {lo}, got {name}={v!r}.")
        _check(n_pix <= pad_factor * n_pupil,
               f"n_pix={n_pix} exceeds the DFT grid pad_factor * n_pupil = {pad_factor * n_pupil};"
               f" lower n_pix or raise pad_factor.")
        lambdas = tuple(float(v) for v in lambdas)
        _check(len(lambdas) >= 1 and all(v > 0 for v in lambdas),
               f"lambdas must be a non-empty list of positive wavelengths (micrometres), "
               f"got lambdas={lambdas}.")
        for name, lims in (("x_lims", x_lims), ("y_lims", y_lims)):
            _check(len(lims) == 2 and float(lims[0]) < float(lims[1]),
                   f"{name} must be (low, high) with low < high, got {name}={tuple(lims)}.")
        for name, v in (("obscuration", obscuration), ("spider_width", spider_width)):
            _check(0.0 <= v < 1.0, f"{name} must be in [0, 1), got {name}={v}; use 0 for none.")

        self.n_pupil, self.pad_factor, self.n_pix = int(n_pupil), int(pad_factor), int(n_pix)
        self.n_zernikes, self.d_max = int(n_zernikes), int(d_max)
        self.n_features, self.d_max_nonparam = int(n_features), int(d_max_nonparam)
        self.lambdas = lambdas
        self.x_lims = (float(x_lims[0]), float(x_lims[1]))
        self.y_lims = (float(y_lims[0]), float(y_lims[1]))
        self.obscuration, self.spiders = float(obscuration), int(spiders)
        self.spider_width = float(spider_width)

        pupil = pupil_mask(self.n_pupil, self.obscuration, self.spiders, self.spider_width)
        self.pupil = jnp.asarray(pupil)
        self.zernike_basis = jnp.asarray(zernike_basis(self.n_zernikes, self.n_pupil))
        self.coeff_mat, self.S_mat = _init_arrays(
            key, (self.n_zernikes, n_monomials(self.d_max)),
            (self.n_features, self.n_pupil, self.n_pupil), self.pupil)
        self.alpha_mat = self._alpha_identity()

    @property
    def n_lambda(self) -> int:
        """Number of wavelength bins (the SED length)."""
        return len(self.lambdas)

    def _alpha_identity(self) -> Array:
        return jnp.eye(self.n_features, n_monomials(self.d_max_nonparam), dtype=jnp.float32)

    def _monomials(self, positions: Array, degree: int) -> Array:
        if positions.ndim != 2 or positions.shape[-1] != 2:
            raise ValueError(f"positions must have shape (batch, 2), got {positions.shape}.")
        lo = jnp.asarray([self.x_lims[0], self.y_lims[0]], jnp.float32)
        hi = jnp.asarray([self.x_lims[1], self.y_lims[1]], jnp.float32)
        xy = 2.0 * (positions.astype(jnp.float32) - lo) / (hi - lo) - 1.0
        return position_monomials(xy, degree)

    def opd_parametric(self, positions: Array) -> Array:
        """Zernike part of the OPD (B, G, G) in micrometres, zero outside the pupil."""
        coeffs = self._monomials(positions, self.d_max) @ self.coeff_mat.astype(jnp.float32).T
        basis = jax.lax.stop_gradient(self.zernike_basis.astype(jnp.float32))
        return jnp.einsum("bz,zgh->bgh", coeffs, basis) * jax.lax.stop_gradient(self.pupil)

    def features(self) -> Array:
        """The non-parametric OPD maps as used (n_features, G, G): `S_mat` band-limited to the
        spatial frequencies the PSF crop can see (`bandlimit_matrix`).

        Without the low-pass, Adam's per-pixel steps let the high spatial frequencies of `S_mat`
        (invisible in an `n_pix` crop) random-walk and pollute the OPD.
        """
        m = jnp.asarray(bandlimit_matrix(self.n_pupil, self.n_pix / (2 * self.pad_factor)))
        return jnp.einsum("ij,fjk,lk->fil", m, self.S_mat.astype(jnp.float32), m)

    def opd_nonparametric(self, positions: Array) -> Array:
        """Learned-map part of the OPD (B, G, G) in micrometres, zero outside the pupil."""
        feats = self._monomials(positions, self.d_max_nonparam)
        weights = feats @ self.alpha_mat.astype(jnp.float32).T  # (B, n_features)
        opd = jnp.einsum("bf,fgh->bgh", weights, self.features())
        return opd * jax.lax.stop_gradient(self.pupil)

    def opd(self, positions: Array) -> Array:
        """Total OPD (B, G, G) in micrometres at star positions (B, 2)."""
        return self.opd_parametric(positions) + self.opd_nonparametric(positions)

    def __call__(self, positions: Array, seds: Array) -> Array:
        """Polychromatic PSFs (B, n_pix, n_pix), float32, each summing to 1.

        Args:
            positions: star positions in field coordinates, shape (B, 2).
            seds: SED weights per wavelength bin, shape (B, n_lambda), each row summing to 1.
        """
        if seds.ndim != 2 or seds.shape != (positions.shape[0], self.n_lambda):
            raise ValueError(f"seds must have shape (batch, n_lambda) = "
                             f"({positions.shape[0]}, {self.n_lambda}), got {seds.shape}.")
        return polychromatic_psf(self.opd(positions), seds, jax.lax.stop_gradient(self.pupil),
                                 self.lambdas, self.pad_factor, self.n_pix)

    def set_alpha_zero(self) -> "PSFFieldModel":
        """A copy with `alpha_mat` zeroed: the non-parametric OPD is exactly 0."""
        return eqx.tree_at(lambda m: m.alpha_mat, self, jnp.zeros_like(self.alpha_mat))

    def set_alpha_identity(self) -> "PSFFieldModel":
        """A copy with `alpha_mat` back at its (rectangular) identity initialisation."""
        eye = self._alpha_identity().astype(self.alpha_mat.dtype)
        return eqx.tree_at(lambda m: m.alpha_mat, self, eye)

    def arch(self) -> dict[str, Any]:
        """JSON-able constructor keyword arguments (`build_model` rebuilds the model from them)."""
        return {
            "n_pupil": self.n_pupil, "pad_factor": self.pad_factor,
            "n_pix": self.n_pix, "n_zernikes": self.n_zernikes, "d_max": self.d_max,
            "n_features": self.n_features, "d_max_nonparam": self.d_max_nonparam,
            "lambdas": list(self.lambdas), "x_lims": list(self.x_lims),
            "y_lims": list(self.y_lims), "obscuration": self.obscuration, "spiders": self.spiders,
            "spider_width": self.spider_width,
        }
