"""The checkpoint errors, shared by the Orbax manager and the single-file model format."""


class CheckpointError(ValueError):
    """No usable checkpoint: missing, incomplete or corrupt (the caller may start afresh)."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint is readable but does not fit the template (another model, other shapes or
    dtypes, another PRNG implementation): not a corruption, so nothing is set aside. The message
    names every differing leaf."""
