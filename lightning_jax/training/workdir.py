"""A run's directory: the lock that keeps it to one run, and `config.json`.

  <workdir>/run.lock       held (`flock`) by the run's process 0
  <workdir>/config.json    the run's effective config, written at start
  <workdir>/checkpoints/   `training.checkpoint`
  <workdir>/metrics.jsonl  `training.metrics`

`config.json` holds `{"flags": ..., "model": ..., "train": ...}`: how the run
was launched (`TrainConfig.flags`, e.g. every flag of `tools/train.py`), the
model config and the other `TrainConfig` fields. A rerun on the workdir reads
the flags back (`read_run_config`, `resume_flags`): what it does not give
takes the workdir's values, and what it changes is refused unless allowed.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import socket

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"


class WorkdirError(RuntimeError):
  """The workdir is in use by another run, or cannot be written."""


@contextlib.contextmanager
def lock_workdir(workdir: str):
  """Holds `<workdir>/run.lock` exclusively while the block runs.

  An advisory `flock`, released by the kernel when the holder exits (also on
  kill -9), so a dead run never leaves a stale lock. The file names the
  holder (`host pid`).

  Raises:
    WorkdirError: another run holds the lock, or the workdir cannot be
      created or written (found before anything compiles).
  """
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir!r} cannot be written: {e}") from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
      raise WorkdirError(
        f"--workdir={workdir!r} is in use by another run "
        f"({holder or 'unknown holder'}); wait for it or use another "
        "--workdir."
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


def check_writable(directory: str, flag: str = "--workdir") -> None:
  """Creates `directory` and writes a probe file in it.

  Raises:
    WorkdirError: it cannot be created or written (e.g. a file is in the
      way, or the file system is read-only), naming `flag`.
  """
  probe = os.path.join(directory, f".probe-{os.getpid()}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"{flag}: {directory!r} cannot be written: {e}") from e


def run_config_record(config) -> dict:
  """The JSON record of a `TrainConfig` that `config.json` holds."""
  train = {
    f.name: getattr(config, f.name)
    for f in dataclasses.fields(config)
    if f.name not in ("model", "flags", "optim", "loss")
  }
  return {
    "flags": config.flags,
    "model": config.model.to_dict(),
    "train": {
      **train,
      "optim": dataclasses.asdict(config.optim),
      "loss": dataclasses.asdict(config.loss),
    },
  }


def write_run_config(config) -> None:
  """Writes `<workdir>/config.json` atomically (temporary file, rename)."""
  path = os.path.join(config.workdir, CONFIG_FILE)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(run_config_record(config), f, indent=1, default=str)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_run_config(workdir: str) -> dict | None:
  """`<workdir>/config.json` as a dict, or None when there is none.

  Raises:
    WorkdirError: the file exists but is not a config record.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path} is unreadable: {e}") from None
  if not isinstance(record, dict) or not isinstance(record.get("flags"), dict):
    raise WorkdirError(f"{path} holds no 'flags' record.")
  return record


def _jsonable(value):
  """`value` as it reads back from JSON (tuples as lists)."""
  return json.loads(json.dumps(value, default=str))


def resume_flags(
  saved: dict,
  given: dict,
  explicit: set,
  *,
  frozen: set,
  growing: set = frozenset(),
  allow_change: bool = False,
) -> dict:
  """The flags of a rerun on a workdir whose first run used `saved`.

  Args:
    saved: flag values from the workdir's `config.json`.
    given: this invocation's flag values (defaults included).
    explicit: names of the flags given on the command line.
    frozen: flags that change what is trained (a rerun may not change
      them).
    growing: numeric flags of `frozen` that may grow (e.g. steps).
    allow_change: accept changes of frozen flags.

  Returns:
    `given`, with every flag not in `explicit` taking its saved value.

  Raises:
    ValueError: one line naming every frozen flag given with another value
      than the saved one (unless `allow_change`).
  """
  values = dict(given)
  changed = []
  for name, old in saved.items():
    if name not in values:
      continue
    if name not in explicit:
      values[name] = old
      continue
    new = _jsonable(values[name])
    if name not in frozen or new == old:
      continue
    if name in growing and new >= old:
      continue
    changed.append(f"--{name}={old!r} -> {new!r}")
  if changed and not allow_change:
    raise ValueError(
      f"this workdir's run was started with other values: "
      f"{', '.join(changed)}; rerun without them, pass "
      "--allow_config_change, or use a fresh --workdir."
    )
  return values
