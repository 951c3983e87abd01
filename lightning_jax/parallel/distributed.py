"""Multi-process start-up: `jax.distributed` with bounded failure detection.

One process per host (or, for tests, several CPU processes on one machine).
After `initialize_distributed`, `jax.devices()` lists the devices of every
process, so `make_mesh` spans them all; each process feeds and reads only its
addressable shards.
"""

import jax

from lightning_jax import _checks


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  local_cpu_devices: int | None = None,
  heartbeat_timeout_seconds: int = 30,
  initialization_timeout: int = 120,
  shutdown_timeout_seconds: int = 30,
) -> None:
  """Joins this process to a multi-process JAX job.

  Call before any other JAX computation. On TPU pods, Slurm or Open MPI
  call it with no arguments (the cluster is detected). For CPU processes
  (tests, debugging) collectives go through gloo and `local_cpu_devices`
  sets the number of CPU devices of this process.

  Failure detection is bounded: a process that stops sending heartbeats for
  `heartbeat_timeout_seconds` is declared dead and every other process
  terminates with an error naming the missing task (instead of waiting
  forever in a collective); jax's defaults are 100 s heartbeats and 300 s
  waits at start-up and shutdown.

  Args:
    coordinator_address: `"host:port"` of process 0's coordinator service
      (e.g. `"127.0.0.1:12345"` locally); None to auto-detect.
    num_processes: total number of processes; None to auto-detect.
    process_id: this process's index in `[0, num_processes)`; None to
      auto-detect.
    local_cpu_devices: if set, the number of CPU devices of this process
      (`jax_num_cpu_devices`).
    heartbeat_timeout_seconds: seconds without heartbeats before a peer is
      declared dead.
    initialization_timeout: seconds to wait for all processes to connect.
    shutdown_timeout_seconds: seconds to wait for the others at exit.

  Raises:
    ValueError: naming the argument on a bad process count / id / timeout.
    RuntimeError: from jax, if JAX was already initialised.
  """
  if num_processes is not None:
    num_processes = _checks.check_positive_int("num_processes", num_processes)
    if process_id is None or not 0 <= process_id < num_processes:
      raise ValueError(
        f"`process_id` must be in [0, {num_processes}), got {process_id!r}."
      )
  for name, value in (
    ("heartbeat_timeout_seconds", heartbeat_timeout_seconds),
    ("initialization_timeout", initialization_timeout),
    ("shutdown_timeout_seconds", shutdown_timeout_seconds),
  ):
    _checks.check_positive_int(name, value)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if local_cpu_devices is not None:
    jax.config.update(
      "jax_num_cpu_devices",
      _checks.check_positive_int("local_cpu_devices", local_cpu_devices),
    )
  jax.distributed.initialize(
    coordinator_address,
    num_processes,
    process_id,
    initialization_timeout=initialization_timeout,
    heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    shutdown_timeout_seconds=shutdown_timeout_seconds,
  )
