"""The training loop: `run_loop` / `train_loop`, checkpointing as one object (`Checkpointer`),
callbacks and hooks, loss-explosion recovery, progress display and metric writers."""

from .callbacks import Callback as Callback
from .callbacks import EarlyStopping as EarlyStopping
from .callbacks import Hook as Hook
from .callbacks import StepInfo as StepInfo
from .checkpointing import Checkpointer as Checkpointer
from .loop import LoopResult as LoopResult
from .loop import run_loop as run_loop
from .periodic import itstime as itstime
from .recovery import RecoveryPolicy as RecoveryPolicy
from .recovery import TrainingDiverged as TrainingDiverged
from .train_loop import train_loop as train_loop
from .writers import JsonlWriter as JsonlWriter
from .writers import MultiWriter as MultiWriter
from .writers import TensorBoardWriter as TensorBoardWriter
