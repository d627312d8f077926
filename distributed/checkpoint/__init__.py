"""Checkpoints: asynchronous, reshardable Orbax checkpoints of a whole training state
(`CheckpointManager`), and the single-file model format shared with desisky
(`save_checkpoint` / `load_checkpoint` / `load_model`)."""

from .errors import CheckpointError as CheckpointError
from .errors import CheckpointMismatch as CheckpointMismatch
from .manager import CheckpointManager as CheckpointManager
from .manager import SaveStats as SaveStats
from .model_file import load_checkpoint as load_checkpoint
from .model_file import load_model as load_model
from .model_file import make_metadata as make_metadata
from .model_file import read_metadata as read_metadata
from .model_file import save_checkpoint as save_checkpoint
