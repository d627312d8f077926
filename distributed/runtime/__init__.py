"""The process runtime: ``jax.distributed`` start (explicit / environment / SLURM / TPU), device
checks, preemption signals, the hang watchdog, the goodput ledger and the exit codes.

Nothing here imports the rest of the package. Usual order::

    from distributed import runtime
    runtime.configure_host_devices(n)      # CPU only, before jax starts its backends
    info = runtime.initialize()            # explicit args, env vars, or auto-detect
    mesh = ...; runtime.check_devices(mesh)
"""

from . import exit_codes as exit_codes
from .devices import ENV_HOST_DEVICES as ENV_HOST_DEVICES
from .devices import check_devices as check_devices
from .devices import configure_host_devices as configure_host_devices
from .devices import enable_compile_cache as enable_compile_cache
from .process import ENV_COORDINATOR as ENV_COORDINATOR
from .process import ENV_NUM_PROCESSES as ENV_NUM_PROCESSES
from .process import ENV_PROCESS_ID as ENV_PROCESS_ID
from .process import CoordinatorError as CoordinatorError
from .process import RuntimeInfo as RuntimeInfo
from .process import current_info as current_info
from .process import initialize as initialize
from .process import shutdown as shutdown
from .slurm import ENV_SLURM_DEVICES as ENV_SLURM_DEVICES
