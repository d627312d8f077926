"""The seeds' APIs over the one engine: WaveDiff's `make_step` / `train_epoch` /
`general_train_cycle` (seed 000) and the config-driven `Trainer` of desisky, BatteryML and opifex
(seeds 001, 003, 004)."""

from .cycle import general_train_cycle as general_train_cycle
from .history import History as History
from .make_step import make_step as make_step
from .make_step import train_epoch as train_epoch
from .trainer import Trainer as Trainer
from .training_config import TrainingConfig as TrainingConfig
