"""`python -m distributed.predict --model=... --data=in.npz --out=pred.npz`: the model's own
outputs for MLP, PSF and eqx.nn.MLP files; bad input is one `error:` line, exit 2, nothing
written."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import assert_one_line_error, run_cli

from distributed import save_checkpoint
from distributed.cli.predict import main
from distributed.models import MLP, PSFFieldModel


def predict_cli(*args):
    return run_cli(*args, module="distributed.predict", timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Model files and inputs: an MLP with dropout (inference mode must switch it off), a
    small PSF field model, an eqx.nn.MLP."""
    d = tmp_path_factory.mktemp("predict")
    k = jax.random.split(jax.random.key(3), 3)
    models = {"mlp": MLP(5, 3, 16, 2, key=k[0], dropout=0.3),
              "psf": PSFFieldModel(key=k[1], n_pupil=16, n_pix=16, lambdas=(0.6, 0.8)),
              "eqx": eqx.nn.MLP(4, 2, 8, 1, activation=jax.nn.tanh, key=k[2])}
    for name, model in models.items():
        save_checkpoint(model, d / f"{name}.eqx")
    rng = np.random.default_rng(0)
    np.savez(d / "x5.npz", x=rng.normal(size=(37, 5)).astype(np.float32))
    np.savez(d / "x4.npz", x=rng.normal(size=(11, 4)))  # float64: cast to float32
    seds = rng.uniform(0.1, 1.0, size=(21, 2))
    np.savez(d / "stars.npz", positions=rng.uniform(0, 1000, size=(21, 2)),
             seds=(seds / seds.sum(1, keepdims=True)).astype(np.float32))
    return d, models


def test_mlp_predictions_match_the_model_in_inference_mode(files, tmp_path):
    d, models = files
    out = tmp_path / "sub" / "pred.npz"
    p = predict_cli(f"--model={d / 'mlp.eqx'}", f"--data={d / 'x5.npz'}", f"--out={out}",
                    "--batch_size=8")  # 37 rows: 4 full batches and a padded one
    assert p.returncode == 0, p.stderr[-3000:]
    pred = np.load(out)["pred"]
    x = jnp.asarray(np.load(d / "x5.npz")["x"])
    expected = eqx.nn.inference_mode(models["mlp"])(x)
    assert pred.shape == (37, 3) and pred.dtype == np.float32
    np.testing.assert_allclose(pred, expected, rtol=1e-5, atol=1e-6)
    assert "wrote pred (37, 3)" in p.stdout


def test_psf_and_eqx_mlp_predictions(files, tmp_path):
    d, models = files
    p = predict_cli(f"--model={d / 'psf.eqx'}", f"--data={d / 'stars.npz'}",
                    f"--out={tmp_path / 'psf.npz'}", "--batch_size=16")
    assert p.returncode == 0, p.stderr[-3000:]
    pred = np.load(tmp_path / "psf.npz")["pred"]
    stars = np.load(d / "stars.npz")
    expected = models["psf"](jnp.asarray(stars["positions"], jnp.float32),
                             jnp.asarray(stars["seds"]))
    assert pred.shape == (21, 16, 16)
    np.testing.assert_allclose(pred, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(pred.sum(axis=(1, 2)), 1.0, rtol=1e-4)

    q = predict_cli(f"--model={d / 'eqx.eqx'}", f"--data={d / 'x4.npz'}",
                    f"--out={tmp_path / 'eqx.npz'}")
    assert q.returncode == 0, q.stderr[-3000:]
    x = jnp.asarray(np.load(d / "x4.npz")["x"], jnp.float32)
    np.testing.assert_allclose(np.load(tmp_path / "eqx.npz")["pred"],
                               jax.vmap(models["eqx"])(x), rtol=1e-5, atol=1e-6)


def test_a_workdir_is_accepted_as_the_model(files, tmp_path, capsys):
    d, models = files
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.eqx").write_bytes((d / "eqx.eqx").read_bytes())
    assert main([f"--model={tmp_path / 'run'}", f"--data={d / 'x4.npz'}",
                 f"--out={tmp_path / 'p.npz'}"]) == 0
    assert np.load(tmp_path / "p.npz")["pred"].shape == (11, 2)


def _bad_npz(d, name, **arrays):
    path = d / f"{name}.npz"
    np.savez(path, **arrays)
    return path


BAD = {  # case: (model, data builder, words the error line must contain)
    "missing_model": ("nope.eqx", lambda d: d / "x5.npz", ["--model=", "no such file"]),
    "garbage_model": ("garbage.eqx", lambda d: d / "x5.npz",
                      ["--model=", "not a readable model file"]),
    "missing_data": ("mlp.eqx", lambda d: d / "nope.npz", ["--data=", "no such file", "x of"]),
    "not_npz": ("mlp.eqx", lambda d: d / "garbage.eqx", ["is not an .npz file", "numpy.savez"]),
    "pickled": ("mlp.eqx", lambda d: _bad_npz(d, "obj", x=np.array([{}, {}], dtype=object)),
                ["not a readable .npz file"]),
    "missing_array": ("mlp.eqx", lambda d: _bad_npz(d, "y", y=np.ones((3, 5))),
                      ["no array 'x'", "['y']", "x of shape (N, 5)"]),
    "wrong_features": ("mlp.eqx", lambda d: _bad_npz(d, "x4", x=np.ones((3, 4))),
                       ["'x' has shape (3, 4)", "(N, 5)"]),
    "three_d": ("mlp.eqx", lambda d: _bad_npz(d, "x3d", x=np.ones((3, 5, 1))),
                ["'x' has shape (3, 5, 1)"]),
    "strings": ("mlp.eqx", lambda d: _bad_npz(d, "s", x=np.full((3, 5), "a")), ["dtype <U1"]),
    "nan": ("mlp.eqx", lambda d: _bad_npz(d, "nan", x=np.where(np.arange(15).reshape(3, 5) == 7,
                                                               np.nan, 1.0)),
            ["NaN/inf at row 1"]),
    "empty": ("mlp.eqx", lambda d: _bad_npz(d, "empty", x=np.ones((0, 5))), ["no rows"]),
    "seds_width": ("psf.eqx", lambda d: _bad_npz(d, "s3", positions=np.ones((4, 2)),
                                                 seds=np.ones((4, 3))),
                   ["'seds' has shape (4, 3)", "seds of shape (N, 2)"]),
    "rows_differ": ("psf.eqx", lambda d: _bad_npz(d, "rows", positions=np.ones((4, 2)),
                                                  seds=np.ones((5, 2))),
                    ["'seds' has 5 rows but 'positions' has 4"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(files, tmp_path, capsys, case):
    d, _ = files
    (d / "garbage.eqx").write_bytes(b"\x80\x04not a model at all\n\x00\x01")
    model, data, words = BAD[case]
    out = tmp_path / "pred.npz"
    assert main([f"--model={d / model}", f"--data={data(d)}", f"--out={out}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file


@pytest.mark.parametrize("args, words", [
    ([], ["the following arguments are required: --model, --data, --out"]),
    (["--model=m", "--data=d", "--out=pred.txt"], ["--out=pred.txt must name an .npz"]),
    (["--model=m", "--data=d", "--out=p.npz", "--batch_size=0"], ["--batch_size=0"]),
])
def test_usage_errors_are_one_line(capsys, args, words):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(w in err[0] for w in words)


def test_bad_input_in_a_real_process_has_no_traceback(files, tmp_path):
    d, _ = files
    p = predict_cli(f"--model={d / 'psf.eqx'}", f"--data={d / 'x5.npz'}",
                    f"--out={tmp_path / 'p.npz'}")
    assert_one_line_error(p, "no array 'positions'", "positions of shape (N, 2)")
    assert not (tmp_path / "p.npz").exists()
