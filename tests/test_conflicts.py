"""`check_import_name`: another installed distribution that is also imported as `distributed`
(Dask's) is named in one line that says to use a separate virtual environment."""

import pytest

from distributed.cli.conflicts import check_import_name


def fake_distribution(site, name, version, top_level=None, record=None):
    """A real ``.dist-info`` folder, as pip leaves one in site-packages."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if top_level is not None:
        (info / "top_level.txt").write_text(top_level)
    if record is not None:
        (info / "RECORD").write_text(record)


def test_this_environment_has_no_other_distributed():
    assert check_import_name() is None


@pytest.mark.parametrize("name, kwargs", [
    ("distributed", {"top_level": "distributed\n"}),  # Dask's distributed
    ("distributed", {}),  # no top_level.txt: the name is enough
    ("some-fork", {"record": "distributed/__init__.py,sha256=abc,10\nfork.py,,\n"}),
])
def test_another_distribution_providing_distributed_is_reported(tmp_path, monkeypatch, name,
                                                                kwargs):
    fake_distribution(tmp_path, name, "2024.8.0", **kwargs)
    monkeypatch.syspath_prepend(str(tmp_path))
    msg = check_import_name()
    assert msg is not None and "\n" not in msg
    assert f"{name} 2024.8.0" in msg and "own virtual environment" in msg
    assert ("Dask" in msg) == (name == "distributed")


def test_unrelated_distributions_are_not_reported(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "other", "1.0", top_level="other\n")
    fake_distribution(tmp_path, "another", "1.0", record="another/__init__.py,,\n")
    fake_distribution(tmp_path, "jax_bcd_distributed", "9.9", top_level="distributed\n")  # us
    monkeypatch.syspath_prepend(str(tmp_path))
    assert check_import_name() is None
