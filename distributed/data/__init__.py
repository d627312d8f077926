"""Input: sources (arrays, `.npz`, ArrayRecord), the Grain pipeline of global batches, and host
batches -> global `jax.Array`s on the mesh with a checkpointable device prefetcher."""

from .device import DevicePrefetcher as DevicePrefetcher
from .device import to_global as to_global
from .pipeline import BatchIndices as BatchIndices
from .pipeline import epoch_batches as epoch_batches
from .pipeline import epoch_permutation as epoch_permutation
from .pipeline import make_dataset as make_dataset
from .resident import DeviceData as DeviceData
from .sources import ArrayRecordSource as ArrayRecordSource
from .sources import ArraySource as ArraySource
from .sources import DataError as DataError
from .sources import InMemorySource as InMemorySource
from .sources import load_arrays as load_arrays
from .sources import open_source as open_source
from .sources import split_arrays as split_arrays
from .sources import validate_arrays as validate_arrays
from .sources import write_array_record as write_array_record
