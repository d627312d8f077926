"""Loss-explosion recovery: roll back to the last good state, lower the LR, retry.

Non-finite updates are already skipped inside the jitted step (`StepOptions.skip_nonfinite`);
this host-side guard handles losses that stay finite but blow up. It reads each step's loss one
step late (after the next step was dispatched), keeps an on-device snapshot of a verified-good
state every ``snapshot_every`` steps, and on an explosion restores it with the step counter kept
(the data iterator has moved on, so the offending batches are skipped), multiplies the state's
``lr_scale`` by ``lr_reduction`` and counts a retry. After ``max_retries`` it raises
`TrainingDiverged` (the loop saves a checkpoint first).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp

from ..core.tree import tree_copy

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised when the loss kept exploding after ``max_retries`` rollbacks."""


@dataclasses.dataclass(frozen=True)
class RecoveryPolicy:
    """When a loss counts as exploded and what to do about it.

    Attributes:
        explosion_factor: exploded if loss > factor x mean of the last ``window`` losses.
        threshold: exploded if loss > threshold (absolute; ``inf``: off).
        k_sigma: exploded if loss > mean + k_sigma x std of the window (``0``: off).
        window: recent losses kept for the running statistics.
        lr_reduction: factor applied to the learning rate on each rollback.
        max_retries: rollbacks allowed before giving up.
        snapshot_every: steps between in-memory snapshots of a good state.
    """

    explosion_factor: float = 10.0
    threshold: float = math.inf
    k_sigma: float = 0.0
    window: int = 20
    lr_reduction: float = 0.5
    max_retries: int = 3
    snapshot_every: int = 10

    def __post_init__(self):
        if self.explosion_factor <= 1 and self.threshold == math.inf and self.k_sigma <= 0:
            raise ValueError("RecoveryPolicy needs explosion_factor > 1, a threshold or k_sigma.")
        if not 0 < self.lr_reduction <= 1:
            raise ValueError(f"lr_reduction={self.lr_reduction} must be in (0, 1].")
        if self.window < 2 or self.snapshot_every < 1 or self.max_retries < 0:
            raise ValueError("window must be >= 2, snapshot_every >= 1 and max_retries >= 0.")


class Guard:
    def __init__(self, policy: RecoveryPolicy, ledger: Any = None):
        self.policy = policy
        self.losses: collections.deque[float] = collections.deque(maxlen=policy.window)
        self.retries = 0
        self.events: list[dict[str, Any]] = []
        self._candidate: tuple[int, Any] | None = None
        self._good: tuple[int, Any] | None = None

    def observe(self, step: int, state: Any) -> None:
        """After dispatching ``step``: maybe snapshot the (not yet verified) state."""
        if not hasattr(state, "lr_scale"):
            raise TypeError("loss-explosion recovery needs a TrainState (with `lr_scale`).")
        if self._good is None or step % self.policy.snapshot_every == 0:
            if self._candidate is None:
                self._candidate = (step, tree_copy(state))

    def exploded(self, loss: float) -> str | None:
        p = self.policy
        if not math.isfinite(loss):
            return None  # non-finite steps are skipped inside the step itself
        if loss > p.threshold:
            return f"loss {loss:.4g} > threshold {p.threshold:.4g}"
        if len(self.losses) >= max(2, p.window // 2):
            mean = sum(self.losses) / len(self.losses)
            if p.explosion_factor > 1 and loss > p.explosion_factor * max(mean, 1e-30):
                return f"loss {loss:.4g} > {p.explosion_factor:g} x running mean {mean:.4g}"
            if p.k_sigma > 0:
                std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
                if loss > mean + p.k_sigma * std and std > 0:
                    return f"loss {loss:.4g} > mean {mean:.4g} + {p.k_sigma:g} sigma"
        return None

    def check(self, step: int, host: dict[str, float], state: Any) -> Any:
        """Called with step ``step``'s metrics; returns the state to continue from."""
        loss = host.get("loss", float("nan"))
        why = self.exploded(loss)
        if why is None:
            if math.isfinite(loss):
                self.losses.append(loss)
            if self._candidate is not None and self._candidate[0] <= step:
                self._good, self._candidate = self._candidate, None
            return state
        if self.retries >= self.policy.max_retries or self._good is None:
            msg = (f"training diverged at step {step}: {why}; gave up after {self.retries} "
                   f"rollback(s). Lower the learning rate or raise --max_retries.")
            log.error(msg)
            raise TrainingDiverged(msg)
        self.retries += 1
        good_step, good = self._good
        current_step = int(jax.device_get(state.step))
        new_scale = float(jax.device_get(good.lr_scale)) * self.policy.lr_reduction
        event = {"step": step, "reason": why, "rolled_back_to": good_step,
                 "lr_scale": new_scale, "retry": self.retries}
        self.events.append(event)
        log.warning("recovery: %s at step %d; rolling back to step %d, lr_scale -> %.4g "
                    "(retry %d/%d)", why, step, good_step, new_scale, self.retries,
                    self.policy.max_retries)
        self._candidate = None
        restored = dataclasses.replace(
            tree_copy(good),
            step=jnp.asarray(current_step, jnp.int32),
            lr_scale=jnp.asarray(new_scale, jnp.float32),
        )
        # keep the snapshot's lr in sync so a second rollback lowers it further
        self._good = (good_step, dataclasses.replace(good, lr_scale=restored.lr_scale))
        shardings = jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else None,
                                 state)
        return jax.tree.map(
            lambda x, s: jax.device_put(x, s) if isinstance(x, jax.Array) and s is not None
            else x, restored, shardings, is_leaf=lambda x: x is None)


class FiniteWatch:
    """Says when updates were skipped (a non-finite loss or gradient) and fails a run that has
    stopped learning: no finite update in the last window.

    It reads the cumulative ``nonfinite_count`` metric at the loop's read points. A window is
    the steps between two checks, at least ``min_window`` of them (or the whole run, at its end:
    a run that never made a finite update fails however short it is).
    """

    def __init__(self, step: int, count: int, min_window: int = 10):
        self.start = self.checked = (step, count)
        self.min_window = min_window

    def observe(self, step: int, count: int, *, final: bool = False) -> None:
        """Check the window that ends at ``step``; warn about skips, raise when all skipped.

        Raises:
            TrainingDiverged: every update since the last check was skipped.
        """
        s0, c0 = self.checked
        steps, skipped = step - s0, count - c0
        if steps <= 0 or (steps < self.min_window and not final):
            return
        self.checked = (step, count)
        never = step - self.start[0] == count - self.start[1]
        if skipped == steps and (steps >= self.min_window or never):
            msg = (f"no finite update in steps {s0 + 1}..{step}: every loss or gradient was NaN "
                   f"or inf ({count} skipped in all). Check the inputs for huge values, lower "
                   f"the learning rate, or check regularisation settings.")
            log.error(msg)
            raise TrainingDiverged(msg)
        if skipped:
            log.warning("%d update(s) skipped in steps %d..%d (non-finite loss or gradients); "
                        "%d so far", skipped, s0 + 1, step, count)
