"""The embedded synthetic star field for the default PSF job (pure numpy, no files).

Stars sit uniformly over the field, each with a random 3-bin SED. The true OPD (micrometres) is

- a smooth parametric part: the first `n_zernikes` Noll Zernikes (piston excluded) with
  coefficients quadratic in position — what `PSFFieldModel.coeff_mat` can represent; plus
- aberrations outside that basis: Noll Zernikes `n_zernikes + 1 .. n_zernikes + n_extra` and
  a few localized Gaussian bumps, all quadratic in position — only `S_mat`/`alpha_mat` can
  represent these, so both BCD blocks are needed.

Observations are the polychromatic PSFs (computed here with a plain numpy `fft2` in float64, so
the data do not depend on the JAX backend or device count and are identical in every process)
plus Gaussian noise, whose level varies per
star, and "hot" bad pixels flagged in `masks` (0 = good, 1 = bad, excluded from masked losses).
"""

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .psf import position_monomials, pupil_coords, pupil_mask, zernike_basis

STAR_FIELD_DEFAULTS: dict[str, Any] = dict(
    n_pupil=32, pad_factor=2, n_pix=24, n_zernikes=15, lambdas=(0.55, 0.70, 0.85),
    x_lims=(0.0, 1000.0), y_lims=(0.0, 1000.0), obscuration=0.3, spiders=3,
    spider_width=0.2,
)
"""Optics shared by the data and the default `PSFFieldModel` (same keyword names)."""

_BUMP_SIGMA = 0.2  # width of the localized OPD bumps, in units of the pupil radius


def _true_opd(xy_norm: np.ndarray, rng: np.random.Generator, cfg: dict, param_rms: float,
              extra_rms: float, n_extra: int, n_bumps: int) -> tuple[np.ndarray, np.ndarray]:
    """(parametric, outside-basis) true OPDs (N, G, G) at normalised positions (N, 2)."""
    g, nz = cfg["n_pupil"], cfg["n_zernikes"]
    poly = position_monomials(xy_norm, 2, xp=np)  # (N, 6): 1, x, y, x^2, xy, y^2
    decay = np.array([1.0, 0.5, 0.5, 0.3, 0.3, 0.3])
    zern = zernike_basis(nz + n_extra, g).astype(np.float64)
    coeff = rng.normal(size=(nz, 6)) * decay
    coeff[0] = 0.0  # no piston: it is invisible in a PSF
    opd_param = np.einsum("np,zp,zgh->ngh", poly, coeff, zern[:nz])
    extra_coeff = rng.normal(size=(n_extra, 6)) * decay
    opd_extra = np.einsum("np,zp,zgh->ngh", poly, extra_coeff, zern[nz:])
    rho, theta = pupil_coords(g)
    px, py = rho * np.cos(theta), rho * np.sin(theta)
    for _ in range(n_bumps):
        r0, t0 = 0.35 + 0.5 * rng.random(), 2 * np.pi * rng.random()
        dist2 = (px - r0 * np.cos(t0)) ** 2 + (py - r0 * np.sin(t0)) ** 2
        bump = np.exp(-dist2 / (2 * _BUMP_SIGMA**2))
        amp = poly @ (rng.normal(size=6) * decay * 2.0)
        opd_extra = opd_extra + amp[:, None, None] * bump
    pupil = pupil_mask(g, cfg["obscuration"], cfg["spiders"], cfg["spider_width"]).astype(bool)

    def rms(o):
        centred = o[:, pupil] - o[:, pupil].mean(axis=1, keepdims=True)
        return np.sqrt(np.mean(centred**2))

    return opd_param * (param_rms / rms(opd_param)), opd_extra * (extra_rms / rms(opd_extra))


def psf_numpy(opd: np.ndarray, seds: np.ndarray, cfg: dict) -> np.ndarray:
    """Reference polychromatic PSFs: full zero-padded `fft2`, shifted and cropped (float64).

    `cfg` holds optics options (`STAR_FIELD_DEFAULTS` fills the missing ones).
    """
    cfg = {**STAR_FIELD_DEFAULTS, **cfg}
    pupil = pupil_mask(cfg["n_pupil"], cfg["obscuration"], cfg["spiders"], cfg["spider_width"])
    p, n = cfg["pad_factor"] * cfg["n_pupil"], cfg["n_pix"]
    start = p // 2 - n // 2
    out = np.zeros((opd.shape[0], n, n))
    for lam, w in zip(cfg["lambdas"], seds.T, strict=True):
        field = pupil * np.exp(2j * np.pi * opd / lam)
        mono = np.abs(np.fft.fft2(field, s=(p, p))) ** 2
        mono = np.fft.fftshift(mono, axes=(-2, -1))[:, start:start + n, start:start + n]
        out += w[:, None, None] * mono / mono.sum(axis=(-2, -1), keepdims=True)
    return out / out.sum(axis=(-2, -1), keepdims=True)


@functools.lru_cache(maxsize=4)
def _star_field(n_train, n_val, n_test, seed, noise, bad_pixel_frac, param_rms, extra_rms,
                n_extra, n_bumps, cfg_items):
    cfg = dict(cfg_items)
    rng = np.random.default_rng(seed)
    n_all, n_lam = n_train + n_val + n_test, len(cfg["lambdas"])
    xy = rng.uniform(-1.0, 1.0, size=(n_all, 2))
    lo = np.array([cfg["x_lims"][0], cfg["y_lims"][0]])
    hi = np.array([cfg["x_lims"][1], cfg["y_lims"][1]])
    positions = lo + (xy + 1.0) / 2.0 * (hi - lo)
    seds = rng.dirichlet(np.full(n_lam, 3.0), size=n_all)
    opd_param, opd_extra = _true_opd(xy, rng, cfg, param_rms, extra_rms, n_extra, n_bumps)
    opd = opd_param + opd_extra
    clean = np.concatenate([psf_numpy(opd[i:i + 256], seds[i:i + 256], cfg)
                            for i in range(0, n_all, 256)])
    peak = clean.max(axis=(1, 2))
    sigma = noise * peak * np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=n_all))
    targets = clean + sigma[:, None, None] * rng.normal(size=clean.shape)
    masks = (rng.random(clean.shape) < bad_pixel_frac).astype(np.float64)
    hot = peak[:, None, None] * rng.uniform(0.2, 1.0, size=clean.shape)
    targets = np.where(masks > 0, hot, targets)

    def f32(a):
        a = np.array(a, dtype=np.float32)
        a.setflags(write=False)  # cached and shared between callers
        return a

    out, start = {}, 0
    for name, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        s = slice(start, start + n)
        split = {"positions": f32(positions[s]), "seds": f32(seds[s]),
                 "targets": f32(targets[s]), "masks": f32(masks[s]),
                 "weights": f32(np.ones(n))}
        if name != "train":
            split["clean_psfs"] = f32(clean[s])
            split["true_opd"] = f32(opd[s])
        out[name], start = split, start + n
    return out


def make_star_field(
    n_train: int = 1024,
    n_val: int = 128,
    n_test: int = 256,
    seed: int = 0,
    noise: float = 0.01,
    bad_pixel_frac: float = 0.01,
    param_rms: float = 0.03,
    extra_rms: float = 0.015,
    n_extra: int = 21,
    n_bumps: int = 3,
    **optics: Any,
) -> dict[str, dict[str, np.ndarray]]:
    """Build the synthetic star field, deterministically from `seed`.

    Args:
        n_train, n_val, n_test: number of stars per split.
        seed: numpy seed; the same arguments always give bit-identical arrays.
        noise: per-pixel Gaussian noise std as a fraction of each star's peak (the per-star
            level is this times a log-uniform factor in [0.5, 2]).
        bad_pixel_frac: fraction of hot pixels, flagged with mask 1.
        param_rms, extra_rms: OPD RMS (micrometres, piston removed) of the in-basis part and of
            the part outside the parametric basis.
        n_extra: Zernikes beyond `n_zernikes` in the truth. n_bumps: localized OPD bumps.
        **optics: overrides of `STAR_FIELD_DEFAULTS` (n_pupil, pad_factor, n_pix, n_zernikes,
            lambdas, x_lims, y_lims, obscuration, spiders, spider_width) — pass the same to
            `PSFFieldModel`.

    Returns:
        `{"train", "val", "test"}`, each a dict of float32 numpy arrays: `positions` (N, 2),
        `seds` (N, L), `targets` (N, n_pix, n_pix), `masks` (N, n_pix, n_pix), `weights` (N,);
        val and test add `clean_psfs` (N, n_pix, n_pix) and `true_opd` (N, G, G). The arrays are
        cached and shared between calls, hence read-only: copy before modifying.
    """
    unknown = set(optics) - set(STAR_FIELD_DEFAULTS)
    if unknown:
        raise ValueError(f"Unknown optics option(s) {sorted(unknown)}; valid ones are "
                         f"{sorted(STAR_FIELD_DEFAULTS)}.")
    for name, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {name}={v}.")
    if not 0.0 <= bad_pixel_frac < 1.0:
        raise ValueError(f"bad_pixel_frac must be in [0, 1), got bad_pixel_frac={bad_pixel_frac}.")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got noise={noise}.")
    cfg = {**STAR_FIELD_DEFAULTS, **optics}
    cfg = {k: tuple(float(x) for x in v) if isinstance(v, list | tuple) else v
           for k, v in cfg.items()}
    return _star_field(int(n_train), int(n_val), int(n_test), int(seed), float(noise),
                       float(bad_pixel_frac), float(param_rms), float(extra_rms), int(n_extra),
                       int(n_bumps), tuple(sorted(cfg.items())))


def psf_batch_tuple(split: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """The seed's data tuple `(positions, seds, targets, masks)` of one split."""
    return split["positions"], split["seds"], split["targets"], split["masks"]


@eqx.filter_jit
def _predict(model, positions, seds):
    return model(positions, seds), model.opd(positions)


def evaluate_psf(model, split: dict[str, np.ndarray], batch_size: int = 256) -> dict[str, float]:
    """PSF pixel RMSE against the clean PSFs and OPD RMSE (micrometres) against the true OPD.

    The OPD error is measured over the pupil after removing its mean (piston does not change a
    PSF and cannot be learned), and up to the "twin image" ambiguity of phase retrieval: an OPD
    `W(r)` and its twin `-W(-r)` give the same PSFs through a centro-symmetric pupil, so training
    may converge to either; the smaller of the two errors over the whole split is reported (with
    the default asymmetric pupil the direct one normally is the smaller).

    Args:
        model: a `PSFFieldModel` (or any model with `__call__(positions, seds)`, `opd`, `pupil`).
        split: a "val" or "test" split of `make_star_field`.
        batch_size: stars per evaluation batch (the last batch may be smaller: one extra trace).
    """
    if "clean_psfs" not in split or "true_opd" not in split:
        raise ValueError("evaluate_psf needs a split with 'clean_psfs' and 'true_opd' "
                         "(make_star_field's 'val' or 'test'), not 'train'.")
    if split["clean_psfs"].shape[1:] != (model.n_pix, model.n_pix) or \
            split["true_opd"].shape[1:] != (model.n_pupil, model.n_pupil):
        raise ValueError(f"model (n_pix={model.n_pix}, n_pupil={model.n_pupil}) does not match "
                         f"the data (PSFs {split['clean_psfs'].shape[1:]}, OPD "
                         f"{split['true_opd'].shape[1:]}); build both with the same optics.")
    pupil = np.asarray(jax.device_get(model.pupil)) > 0
    pupil &= pupil[::-1, ::-1]  # where both an OPD and its twin are defined
    n = split["positions"].shape[0]
    psf_se, opd_se = 0.0, np.zeros(2)  # OPD error of (the model, its twin)
    for i in range(0, n, batch_size):
        s = slice(i, i + batch_size)
        psf, opd = jax.device_get(_predict(model, jnp.asarray(split["positions"][s]),
                                           jnp.asarray(split["seds"][s])))
        psf_se += float(np.sum((np.asarray(psf, np.float64) - split["clean_psfs"][s]) ** 2))
        opd = np.asarray(opd, np.float64)
        for j, cand in enumerate((opd, -opd[:, ::-1, ::-1])):
            diff = (cand - split["true_opd"][s])[:, pupil]
            opd_se[j] += float(np.sum((diff - diff.mean(axis=1, keepdims=True)) ** 2))
    return {"psf_rmse": float(np.sqrt(psf_se / split["clean_psfs"][:n].size)),
            "opd_rmse": float(np.sqrt(opd_se.min() / (n * pupil.sum())))}
