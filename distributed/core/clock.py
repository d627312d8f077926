"""`EpochClock`: where epochs begin and end on the global step counter."""

from __future__ import annotations

import dataclasses
import numbers


@dataclasses.dataclass(frozen=True)
class EpochClock:
    """Steps and epochs of a stream of global batches that never drops an example.

    The input is one stream of examples: epoch 0's order of the ``num_examples`` examples, then
    epoch 1's, and so on. Global batch ``k`` (0-based) holds stream positions
    ``[k * B, (k + 1) * B)``, so an epoch whose size is not a multiple of ``B`` ends inside a
    batch that it shares with the next epoch (its last rows are *carried* into that batch, none
    is dropped). Epoch ``e`` ends with step ``steps(e + 1) = ceil((e + 1) * N / B)``. When ``B``
    divides ``N`` this is the usual ``N / B`` steps per epoch.

    ``EpochClock(num_batches, 1)`` is a clock of ``num_batches`` steps per epoch (for loops
    given batches per epoch rather than examples).

    Attributes:
        num_examples: examples per epoch, ``N >= 1``.
        batch_size: examples per global batch, ``1 <= B <= N``.
    """

    num_examples: int
    batch_size: int

    def __post_init__(self):
        n, b = self.num_examples, self.batch_size
        for name, v in (("num_examples", n), ("batch_size", b)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"EpochClock {name}={v!r} must be a positive integer.")
        if b > n:
            raise ValueError(f"batch size {b} is larger than an epoch ({n} examples).")

    def steps(self, epochs: int) -> int:
        """Steps after which ``epochs`` epochs are complete: ``ceil(epochs * N / B)``."""
        return -(-int(epochs) * self.num_examples // self.batch_size)

    def epoch_of(self, step: int) -> int:
        """The epoch of the first example of batch index ``step`` (0-based)."""
        return int(step) * self.batch_size // self.num_examples

    def epochs_done(self, step: int) -> int:
        """Epochs complete after ``step`` steps."""
        return int(step) * self.batch_size // self.num_examples

    def epoch_ending_at(self, step: int) -> int | None:
        """The epoch that the ``step``-th step (1-based count of steps done) completes, if any."""
        if step < 1:
            return None
        done = self.epochs_done(step)
        return done - 1 if done > self.epochs_done(step - 1) else None

    @property
    def steps_per_epoch(self) -> float:
        """Average steps per epoch, ``N / B`` (an integer when ``B`` divides ``N``)."""
        n, b = self.num_examples, self.batch_size
        return n // b if n % b == 0 else n / b
