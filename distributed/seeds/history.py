"""`History`: what `Trainer.train` returns besides the model."""

from __future__ import annotations

from typing import Any


class History(dict):
    """Per-epoch metric lists, by key (``history["train_loss"]``) or attribute
    (``history.train_loss``), plus ``best_val_loss`` (alias ``best_test_loss``), ``best_epoch``
    (0-based), ``stopped_epoch`` (None if all epochs ran), ``epochs_run``, ``nonfinite_skipped``
    and ``lr_scale`` (below 1 after loss-explosion rollbacks).

    Keys: ``train_loss``, ``grad_norm``, ``lr`` (per epoch); ``val_loss``, ``val_rmse``,
    ``val_mae``, ``val_mape``, ``val_r2``, ``val_per_output_rmse`` and ``val_epoch`` (the
    epoch of each validation).
    """

    best_val_loss: float | None = None
    best_epoch: int | None = None
    stopped_epoch: int | None = None
    epochs_run: int = 0
    nonfinite_skipped: int = 0
    lr_scale: float = 1.0

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"History has no metric {name!r}; it has {sorted(self)}.") \
                from None

    @property
    def best_test_loss(self) -> float | None:
        return self.best_val_loss
