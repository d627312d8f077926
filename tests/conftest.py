"""Every test sees 8 simulated CPU devices; set before jax initialises."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def getkey():
    """A fresh PRNG key on each call (deterministic per test)."""
    keys = iter(jax.random.split(jax.random.key(0), 10_000))
    return lambda: next(keys)
