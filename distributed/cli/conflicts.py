"""Another installed distribution that also provides the import name ``distributed``.

Dask's distributed scheduler (distribution ``distributed``) is imported as ``distributed`` too.
Installed in one environment, the two packages write into the same ``site-packages/distributed/``
folder: whichever is installed last overwrites the other's files, and imports then fail or, worse,
mix files of both. Python cannot tell which one ``import distributed`` means, so the only fix is
to keep them in separate virtual environments.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re

IMPORT_NAME = "distributed"
OWN_DISTRIBUTION = "jax-bcd-distributed"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _provides(dist: metadata.Distribution, import_name: str) -> bool:
    """Whether ``dist`` installs the top-level package ``import_name``: its name is that (as
    Dask's is), its ``top_level.txt`` lists it, or (without one) its ``RECORD`` has files there."""
    if _canonical(dist.metadata["Name"] or "") == _canonical(import_name):
        return True
    top = dist.read_text("top_level.txt")
    if top is not None:
        return import_name in top.split()
    record = dist.read_text("RECORD")  # faster to scan than dist.files
    if record is not None:
        return any(line.startswith(f"{import_name}/") for line in record.splitlines())
    return any(f.parts and f.parts[0] == import_name for f in dist.files or ())


def check_import_name(own: str = OWN_DISTRIBUTION) -> str | None:
    """A one-line message when another installed distribution also provides ``distributed``.

    Looks at every distribution `importlib.metadata` finds on ``sys.path`` except ``own``.

    Returns:
        ``None`` when this package is the only one; else one line naming the other
        distribution(s) and saying to use a separate virtual environment.
    """
    others = set()
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or "?"
        if _canonical(name) != _canonical(own) and _provides(dist, IMPORT_NAME):
            others.add(f"{name} {dist.version}")
    if not others:
        return None
    dask = " (Dask's distributed scheduler)" if any(
        _canonical(o.split()[0]) == "distributed" for o in others) else ""
    return (f"{', '.join(sorted(others))}{dask} is installed in this environment and is also "
            f"imported as 'distributed': the two overwrite each other's files. Install "
            f"{own} in its own virtual environment (python -m venv .venv), without it.")
