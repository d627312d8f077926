"""jax-bcd-distributed: sharded multi-host training of Equinox models with block coordinate descent."""
