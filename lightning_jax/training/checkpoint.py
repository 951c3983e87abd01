"""Atomic, sharded pytree checkpoints with tensorstore (zarr v3).

On disk (`docs/checkpoints_and_data.md` has the details):

  <directory>/step_00000120/
      metadata.json         step, format, every leaf (path, shape, dtype,
                            kind), the caller's metadata
      arrays/<leaf path>/   one zarr3 array per leaf (chunk = one shard,
                            crc32c checksum per chunk)
      COMMIT                written last; a step without it is incomplete

Protocol of `save` on a local directory: every process writes the chunks of
its addressable shards (replica 0 only) into `<directory>/tmp-<step>-<nonce>/`;
a barrier; process 0 writes `metadata.json` and `COMMIT`, fsyncs, and renames
the directory to `step_<step:08d>` (one atomic rename), then prunes to the
last `keep` steps and removes leftovers of interrupted saves; a second
barrier. On a tensorstore kvstore URL (`gs://`, `file://`, `memory://`: no
atomic rename) the files go straight to `step_<step:08d>/` and `COMMIT` is
written last. A kill at any point leaves either the previous complete steps
or the new complete step, never a half-written `step_*` directory that looks
complete.

`save_async` copies this process's shards to the host and returns; the
writing and the commit run in a background thread (at most one save in
flight), coordinated across processes by the jax distributed client's
key-value store only, never by device collectives.

`restore` reads each leaf with the target's sharding: every process reads
only the index domains its devices hold (`jax.make_array_from_callback`), so
a checkpoint written on one mesh layout restores onto any other.

PRNG keys: a typed key array (`jax.random.key`) is stored as its raw
`jax.random.key_data` (uint32, trailing impl dims) with kind "prng_key" and
the impl name; restore wraps it again with `jax.random.wrap_key_data`.
Legacy raw uint32 keys are ordinary arrays.

Example:
  >>> mgr = CheckpointManager("/tmp/run/checkpoints", keep=3)
  >>> tree = {"w": w, "rng": jax.random.key(0)}    # w: a sharded jax.Array
  >>> mgr.save(100, tree, metadata={"note": "hi"})
  >>> abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
  ...     x.shape, x.dtype, sharding=x.sharding), tree)  # or another mesh's
  >>> tree, metadata = mgr.restore(None, abstract)   # latest complete step
  >>> mgr.save_async(200, tree)   # returns once the tree is on the host
  >>> stats = mgr.wait()          # committed; SaveStats(step, path, ...)
"""

import concurrent.futures
import json
import os
import pathlib
import re
import secrets
import shutil
import time
from typing import NamedTuple
import urllib.parse

from absl import logging
import jax
from jax._src import distributed
from jax.experimental import multihost_utils
import numpy as np
import tensorstore as ts

FORMAT = "lightning_jax.checkpoint/1"
COMMIT_FILE = "COMMIT"
METADATA_FILE = "metadata.json"
ARRAYS_DIR = "arrays"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = "tmp-"
_CODECS = [
  {"name": "bytes", "configuration": {"endian": "little"}},
  {"name": "crc32c"},
]
_BARRIER_TIMEOUT_MS = 60 * 60 * 1000
# The tensorstore context of every checkpoint read and write: a `memory://`
# store lives in it, shared by every manager, for the process's lifetime.
CONTEXT = ts.Context()


class CheckpointError(Exception):
  """A checkpoint cannot be read: missing, incomplete or corrupted data."""


class Snapshot(NamedTuple):
  """A host copy of the pieces of a pytree this process saves (`snapshot`).

  Attributes:
    leaves: the flattened leaves, their data on the host.
  """

  leaves: list


def snapshot(tree) -> Snapshot:
  """Copies this process's pieces of `tree` to the host, for a later `save`.

  The device buffers may then change or be donated; saving the snapshot
  writes the values they had here (e.g. a train state kept until the next
  step has shown that its params give a finite loss).
  """
  leaves = _flatten(tree)
  primary = jax.process_index() == 0
  for leaf in leaves:
    leaf.to_host(primary)
  return Snapshot(leaves)


class SaveStats(NamedTuple):
  """Timings of one committed save (`CheckpointManager.last_save`).

  Attributes:
    step: the saved step.
    path: its committed directory, `step_path(step)`.
    stall_s: seconds the caller was blocked in `save` / `save_async`, the
      wait for the previous save and the host copy included.
    write_s: seconds from the start of the write to the commit (in the
      background thread for `save_async`).
  """

  step: int
  path: pathlib.Path | str
  stall_s: float
  write_s: float


class _Job(NamedTuple):
  """A save prepared on the caller's thread, ready to write."""

  step: int
  leaves: list
  record: str  # the metadata.json text
  nonce: str  # the same on every process


class CheckpointManager:
  """Saves and restores pytrees of arrays as numbered, atomic checkpoints.

  `save_async` overlaps the writing with the caller's work; `wait()` (or
  `close()`, or leaving a `with` block) blocks until it has committed.

  Args:
    directory: where `step_<n>` directories live: a local path (created if
      missing) or a tensorstore kvstore URL (`gs://bucket/run/`,
      `file:///abs/dir/`, `memory://name/`).
    keep: how many most recent complete steps to keep (>= 1).
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
      raise ValueError(f"`keep` must be an int >= 1, got {keep!r}.")
    self._store = _open_store(directory)
    self.directory = self._store.path("")
    self.keep = keep
    self.last_save: SaveStats | None = None
    self._warned: set[str] = set()
    self._pending: concurrent.futures.Future | None = None
    self._executor = concurrent.futures.ThreadPoolExecutor(
      max_workers=1, thread_name_prefix="lightning_jax_checkpoint"
    )

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  # ----------------------------------------------------------------- listing
  def step_path(self, step: int) -> pathlib.Path | str:
    """The directory of complete step `step` (whether or not it exists): a
    `pathlib.Path` in a local directory, a URL string in a kvstore."""
    return self._store.path(_step_name(step))

  def all_steps(self) -> list[int]:
    """Complete steps in increasing order; warns about incomplete ones."""
    steps = []
    for name, complete in sorted(self._store.entries().items()):
      match = _STEP_RE.match(name)
      if match and complete:
        steps.append(int(match.group(1)))
      elif match or name.startswith(_TMP_PREFIX):
        self._warn_once(
          self._store.path(name),
          "incomplete checkpoint ignored (no COMMIT "
          "marker; an interrupted save?)",
        )
    return sorted(steps)

  def latest_step(self) -> int | None:
    """The newest complete step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _warn_once(self, path, message: str) -> None:
    if str(path) not in self._warned:
      self._warned.add(str(path))
      logging.warning("%s: %s", path, message)

  # -------------------------------------------------------------------- save
  def save(
    self, step: int, tree, metadata: dict | None = None
  ) -> pathlib.Path | str:
    """Writes `tree` as complete step `step`, atomically; collective.

    Every process must call it with the same step and tree structure. A
    pending `save_async` is waited for first (its error, if any, is raised
    here).

    Args:
      step: non-negative int.
      tree: pytree of jax.Arrays (any sharding, possibly spanning processes),
        numpy arrays or Python scalars (written by process 0), or a
        `Snapshot` of one taken earlier.
      metadata: JSON-serialisable dict stored beside the arrays.

    Returns:
      The committed step directory, `step_path(step)`.
    """
    start = time.perf_counter()
    job = self._prepare(step, tree, metadata, copy=False)
    return self._write(job, time.perf_counter() - start, background=False).path

  def save_async(self, step: int, tree, metadata: dict | None = None) -> None:
    """Starts saving `tree` as step `step` and returns; collective.

    On the caller's thread: waits for the previous save (raising its error,
    if any, instead of starting this one), checks the arguments, copies this
    process's shards of `tree` to the host (`snapshot`; a `Snapshot` is used
    as is) and agrees on a nonce. The caller may then change or donate the
    arrays of `tree`. A background thread writes the arrays, metadata.json
    and COMMIT, commits and prunes, like `save`; `wait()` returns its
    `SaveStats` or raises its error.

    Args:
      step: non-negative int.
      tree: as for `save`.
      metadata: JSON-serialisable dict stored beside the arrays.

    Example:
      >>> mgr.save_async(step, state)
      >>> state, metrics = train_step(state, batch)  # overlaps the write
      >>> mgr.wait().stall_s                          # or the next save_async
    """
    start = time.perf_counter()
    job = self._prepare(step, tree, metadata, copy=True)
    self._pending = self._executor.submit(
      self._write, job, time.perf_counter() - start, background=True
    )

  def wait(self) -> SaveStats | None:
    """Blocks until the pending `save_async` has committed.

    Returns:
      Its `SaveStats`, or None when no save was pending.

    Raises:
      Whatever the background save raised (once; the save is then dropped).
    """
    pending, self._pending = self._pending, None
    return None if pending is None else pending.result()

  def close(self) -> None:
    """Waits for the pending save (raising its error) and ends the thread."""
    try:
      self.wait()
    finally:
      self._executor.shutdown()

  def _prepare(self, step, tree, metadata, copy: bool) -> _Job:
    """The caller's part of a save: checks, waits for the previous save,
    takes a host copy (`copy`) and the shared nonce."""
    if (
      isinstance(step, bool)
      or not isinstance(step, (int, np.integer))
      or (step < 0)
    ):
      raise ValueError(f"`step` must be a non-negative int, got {step!r}.")
    step = int(step)
    metadata = {} if metadata is None else metadata
    try:
      user_json = json.dumps(metadata)
    except TypeError as err:
      raise ValueError(f"`metadata` must be JSON-serialisable: {err}") from err
    self.wait()
    if isinstance(tree, Snapshot):
      leaves = tree.leaves
    else:
      leaves = snapshot(tree).leaves if copy else _flatten(tree)
    record = {
      "format": FORMAT,
      "step": step,
      "leaves": [leaf.record() for leaf in leaves],
      "metadata": json.loads(user_json),
    }
    return _Job(step, leaves, json.dumps(record, indent=1), _shared_nonce())

  def _write(self, job: _Job, prepare_s: float, background: bool) -> SaveStats:
    """Writes and commits a prepared save, in the background thread if
    `background`; records and logs its `SaveStats`.

    Args:
      job: from `_prepare`.
      prepare_s: seconds the caller was blocked in `_prepare`.
      background: whether the caller was released before this write.
    """
    start = time.perf_counter()
    primary = jax.process_index() == 0
    staging = self._store.staging_name(job.step, job.nonce)
    barrier = f"lightning_jax_ckpt_{job.step}_{job.nonce}"
    try:
      _on_every_process(
        f"{barrier}_begun", lambda: primary and self._begin(staging)
      )
      _on_every_process(
        f"{barrier}_written",
        lambda: _write_leaves(
          self._store.location(staging) / ARRAYS_DIR, job.leaves, primary
        ),
      )
      _on_every_process(
        f"{barrier}_committed",
        lambda: primary and self._commit(job.step, staging, job.record),
      )
    except Exception:
      if background:  # raised again by the caller's next wait / save
        logging.exception("Checkpoint step %d failed.", job.step)
      if primary:  # e.g. a full disk: free what the failed save wrote
        self._discard_failed(staging)
      raise
    write_s = time.perf_counter() - start
    stats = SaveStats(
      job.step,
      self.step_path(job.step),
      prepare_s if background else prepare_s + write_s,
      write_s,
    )
    logging.info(
      "Checkpoint %s committed: written in %.3f s, caller stalled %.3f s.",
      stats.path,
      stats.write_s,
      stats.stall_s,
    )
    self.last_save = stats
    return stats

  def _discard_failed(self, staging: str) -> None:
    """Process 0: removes a failed save's staging entry (best effort: the
    next save removes leftovers too)."""
    try:
      self._store.discard(staging)
    except Exception:  # pylint: disable=broad-except
      logging.exception("Could not remove %s.", self._store.path(staging))

  def _begin(self, staging: str) -> None:
    """Process 0: removes leftovers of interrupted saves, opens `staging`."""
    for name, complete in self._store.entries().items():
      incomplete = _STEP_RE.match(name) and not complete
      if name != staging and (name.startswith(_TMP_PREFIX) or incomplete):
        logging.warning(
          "%s: removing an incomplete checkpoint.", self._store.path(name)
        )
        self._store.discard(name)
    self._store.begin(staging)

  def _commit(self, step: int, staging: str, record: str) -> None:
    """Process 0: metadata.json, then COMMIT, publish; keeps the newest
    `keep` complete steps."""
    self._store.write(staging, METADATA_FILE, record)
    self._store.write(staging, COMMIT_FILE, f"{step}\n")
    self._store.publish(staging, _step_name(step))
    for old in self.all_steps()[: -self.keep]:
      self._store.discard(_step_name(old))

  # ----------------------------------------------------------------- restore
  def restore(self, step: int | None, target=None, *, partial: bool = False):
    """Reads a checkpoint, resharding every leaf onto the target's sharding.

    Args:
      step: a step to read, or None for the latest complete step that reads
        cleanly (a corrupt step is logged as an error and the previous one
        tried).
      target: pytree matching the saved tree, with leaves carrying `.shape`,
        `.dtype` and optionally `.sharding` (jax.ShapeDtypeStruct or arrays).
        Leaves with a sharding come back as jax.Arrays with that sharding,
        others as numpy arrays. None: a numpy tree rebuilt from the saved
        paths (dicts for dict keys and attributes, lists for sequences).
      partial: allow `target` to name a subset of the saved leaves (matched
        by key path), e.g. `{"params": abstract_params}` out of a saved train
        state; only those arrays are read.

    Returns:
      (tree, metadata): the restored tree and the dict given to `save`.

    Raises:
      CheckpointError: no complete checkpoint, or (explicit `step`) the step
        is missing or corrupted; the message names the checkpoint and array.
      ValueError: the target's structure, shapes or dtypes differ from the
        checkpoint's (naming the leaf).
    """
    if step is not None:
      result, error = self._agreed_restore(int(step), target, partial)
      if error is not None:
        raise error
      return result
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no complete checkpoint in {self.directory}.")
    errors = []
    for candidate in reversed(steps):
      result, error = self._agreed_restore(candidate, target, partial)
      if error is None:
        return result
      logging.error("%s; falling back to the previous complete step.", error)
      errors.append(str(error))
    raise CheckpointError(
      "no complete checkpoint could be restored:\n" + "\n".join(errors)
    )

  def _agreed_restore(self, step: int, target, partial: bool):
    """(result, None) if every process read `step`, else (None, error).

    The processes agree (`_all_processes_ok`), so that all of them fall back
    or raise together, even when only one read a corrupt chunk.
    """
    agreement = f"lightning_jax_ckpt_restore_{step}_{_shared_nonce()}"
    try:
      result, error = self._restore_step(step, target, partial), None
    except CheckpointError as err:
      result, error = None, err
    if _all_processes_ok(agreement, error is None):
      logging.info("Restored checkpoint %s.", self.step_path(step))
      return result, None
    return None, error or CheckpointError(
      f"{self.step_path(step)}: another process failed to read it."
    )

  def _restore_step(self, step: int, target, partial: bool):
    name, path = _step_name(step), self.step_path(step)
    if not self._store.exists(name, COMMIT_FILE):
      raise CheckpointError(f"{path}: no complete checkpoint for step {step}.")
    try:
      record = json.loads(self._store.read(name, METADATA_FILE))
    except (OSError, ValueError) as err:
      raise CheckpointError(
        f"{path}: unreadable {METADATA_FILE}: {err}"
      ) from err
    _check_record(path, record)
    saved, location = record["leaves"], self._store.location(name)
    if target is None:  # Raw numpy, keys included (as their key data).
      arrays = _read_leaves(location, saved, [None] * len(saved))
      return _unflatten_paths(saved, arrays), record["metadata"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    records = _check_target(path, saved, flat, partial)
    arrays = _read_leaves(location, records, [leaf for _, leaf in flat])
    return jax.tree_util.tree_unflatten(treedef, arrays), record["metadata"]


def _check_record(path: pathlib.Path, record) -> None:
  """CheckpointError unless `record` is a metadata.json of this format."""
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    found = record.get("format") if isinstance(record, dict) else record
    raise CheckpointError(
      f"{path}: {METADATA_FILE} is not a {FORMAT!r} record (format {found!r})."
    )
  leaves = record.get("leaves")
  if not isinstance(leaves, list) or not isinstance(
    record.get("metadata"), dict
  ):
    raise CheckpointError(
      f"{path}: {METADATA_FILE} lacks its 'leaves' list or 'metadata' dict."
    )
  for leaf in leaves:
    if not isinstance(leaf, dict) or not {"path", "shape", "dtype"} <= set(
      leaf
    ):
      raise CheckpointError(f"{path}: {METADATA_FILE} has a bad leaf {leaf!r}.")


# ------------------------------------------------------------------- leaves
class _Leaf:
  """One leaf to save: its path, stored array and how to write it."""

  def __init__(self, keypath, value):
    self.keypath = [_key_entry(k) for k in keypath]
    self.name = _leaf_name(keypath)
    self.kind, self.impl = "array", None
    if isinstance(value, jax.Array) and _is_key_dtype(value.dtype):
      self.kind, self.impl = "prng_key", str(jax.random.key_impl(value))
      value = jax.random.key_data(value)
    elif not isinstance(value, jax.Array):
      value = np.asarray(value)
    self.value = value
    self.shape = tuple(value.shape)
    self.dtype = np.dtype(value.dtype)
    self.chunks = [
      max(1, d)
      for d in (
        value.sharding.shard_shape(self.shape)
        if isinstance(value, jax.Array)
        else self.shape
      )
    ]
    self.host_pieces = None

  def to_host(self, primary: bool) -> None:
    """Keeps host copies of the pieces and drops the array."""
    self.host_pieces = [(i, np.array(d)) for i, d in self.pieces(primary)]
    self.value = None

  def record(self) -> dict:
    out = {
      "path": self.name,
      "keypath": self.keypath,
      "shape": list(self.shape),
      "dtype": self.dtype.name,
      "kind": self.kind,
    }
    if self.impl is not None:
      out["impl"] = self.impl
    return out

  def pieces(self, primary: bool):
    """(index, host array) pairs this process writes."""
    if self.host_pieces is not None:
      return self.host_pieces
    if not isinstance(self.value, jax.Array):
      return [((), self.value)] if primary else []
    return [
      (shard.index, shard.data)
      for shard in self.value.addressable_shards
      if shard.replica_id == 0
    ]


def _key_entry(key) -> list:
  """A JSON form of one tree_util key: [kind, name]."""
  if isinstance(key, jax.tree_util.DictKey):
    return [
      "dict",
      key.key if isinstance(key.key, (str, int)) else str(key.key),
    ]
  if isinstance(key, jax.tree_util.SequenceKey):
    return ["seq", key.idx]
  if isinstance(key, jax.tree_util.GetAttrKey):
    return ["attr", key.name]
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return ["index", key.key]
  return ["other", str(key)]


def _leaf_name(keypath) -> str:
  """Directory of a leaf under arrays/: its key path, URL-quoted, '/'-joined."""
  return (
    "/".join(
      urllib.parse.quote(str(_key_entry(k)[1]), safe="") for k in keypath
    )
    or "_"
  )


def _flatten(tree) -> list[_Leaf]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  leaves = [_Leaf(path, value) for path, value in flat]
  names = [leaf.name for leaf in leaves]
  if len(set(names)) != len(names):
    raise ValueError(f"`tree` has leaves with colliding paths: {names}.")
  return leaves


def _zarr_spec(location, shape=None, dtype=None, chunks=None) -> dict:
  """Spec of the zarr3 array in `location` (a local path or a kvstore spec);
  to create it when `shape` is given."""
  spec = {"driver": "zarr3", "kvstore": _kvstore(location)}
  if shape is None:
    spec["fill_missing_data_reads"] = False
    return spec
  spec["store_data_equal_to_fill_value"] = True
  spec["metadata"] = {
    "shape": list(shape),
    "data_type": np.dtype(dtype).name,
    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
    # Chunk files side by side (c.0.1), not one directory per index.
    "chunk_key_encoding": {
      "name": "default",
      "configuration": {"separator": "."},
    },
    "codecs": _CODECS,
  }
  return spec


def _write_leaves(root, leaves: list[_Leaf], primary: bool):
  """Writes this process's pieces of every leaf under `root` (a local path
  or a kvstore spec); waits for all writes."""
  # Process 0 creates each array's zarr.json; the others assume it.
  opened = [
    ts.open(
      _zarr_spec(root / leaf.name, leaf.shape, leaf.dtype, leaf.chunks),
      create=primary,
      open=not primary,
      assume_metadata=not primary,
      context=CONTEXT,
    )
    for leaf in leaves
  ]
  writes = []
  for leaf, future in zip(leaves, opened, strict=True):
    store = future.result()
    for index, data in leaf.pieces(primary):
      if np.prod(np.shape(data)) > 0:
        writes.append(store[index].write(np.asarray(data)))
  for write in writes:
    write.result()


def _check_target(
  path: pathlib.Path, saved: list[dict], flat, partial: bool
) -> list[dict]:
  """Saved records aligned with the target's leaves; ValueError on mismatch."""
  by_name = {leaf["path"]: leaf for leaf in saved}
  aligned = []
  for keypath, value in flat:
    name = _leaf_name(keypath)
    if name not in by_name:
      raise ValueError(
        f"`target` leaf {name!r} is not in checkpoint {path} "
        f"(saved leaves: {sorted(by_name)})."
      )
    leaf = by_name[name]
    want_shape, want_dtype = _stored_shape_dtype(value)
    if list(want_shape) != leaf["shape"] or want_dtype.name != leaf["dtype"]:
      raise ValueError(
        f"`target` leaf {name!r} is {want_dtype.name}{list(want_shape)} but "
        f"checkpoint {path} holds {leaf['dtype']}{leaf['shape']}."
      )
    aligned.append(leaf)
  missing = sorted(set(by_name) - {leaf["path"] for leaf in aligned})
  if missing and not partial:
    raise ValueError(
      f"`target` lacks leaves saved in checkpoint {path}: "
      f"{missing} (pass partial=True to read a subset)."
    )
  return aligned


def _is_key_dtype(dtype) -> bool:
  return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _stored_shape_dtype(target_leaf):
  """(shape, dtype) as stored for a target leaf (keys -> their raw data).

  A target leaf without `.dtype` (a Python scalar) counts as np.asarray(it).
  """
  if not hasattr(target_leaf, "dtype"):
    target_leaf = np.asarray(target_leaf)
  if _is_key_dtype(target_leaf.dtype):
    data = jax.eval_shape(
      jax.random.key_data,
      jax.ShapeDtypeStruct(target_leaf.shape, target_leaf.dtype),
    )
    return tuple(data.shape), np.dtype(data.dtype)
  return tuple(np.shape(target_leaf)), np.dtype(target_leaf.dtype)


def _bounds(index: tuple, shape: tuple) -> tuple:
  """Index of unit-step slices (maybe short, open-ended) -> ((lo, hi), ...)."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=True))


def _slices(bounds: tuple) -> tuple:
  return tuple(slice(lo, hi) for lo, hi in bounds)


def _read_leaves(location, records: list[dict], targets: list):
  """Reads leaves `records[i]` of the step in `location` (a local path or a
  kvstore spec) onto `targets[i]` (None -> a numpy array).

  All reads are issued before any is awaited; each process reads only the
  index domains of its addressable devices (each domain once).
  """
  path = _display(location)
  opened = [
    ts.open(
      _zarr_spec(location / ARRAYS_DIR / leaf["path"]),
      open=True,
      read=True,
      context=CONTEXT,
    )
    for leaf in records
  ]
  requests = []
  for leaf, target, future in zip(records, targets, opened, strict=True):
    shape = tuple(leaf["shape"])
    store = _result(path, leaf["path"], future)
    sharding = getattr(target, "sharding", None)
    if sharding is None:
      indices = {_bounds((), shape)}
    else:
      indices = {
        _bounds(i, shape)
        for i in sharding.addressable_devices_indices_map(
          tuple(target.shape)
        ).values()
      }
    reads = {i: store[_slices(i)].read() for i in indices}
    requests.append((leaf, target is not None, sharding, reads))
  return [_assemble(path, *request) for request in requests]


def _assemble(path, leaf, typed: bool, sharding, reads):
  """A jax.Array with `sharding` (or numpy when None) from finished reads.

  `typed`: a target was given, so key data is wrapped into a key array.
  """
  host = {i: _result(path, leaf["path"], f) for i, f in reads.items()}
  key = typed and leaf["kind"] == "prng_key"
  if sharding is None:
    (value,) = host.values()
    return jax.random.wrap_key_data(value, impl=leaf["impl"]) if key else value
  shape = tuple(leaf["shape"])
  data = jax.make_array_from_callback(
    shape,
    _key_data_sharding(sharding, len(shape)) if key else sharding,
    lambda index: host[_bounds(index, shape)],
  )
  return jax.random.wrap_key_data(data, impl=leaf["impl"]) if key else data


def _key_data_sharding(sharding, data_rank: int):
  """Sharding of a key array's raw data: trailing impl dims replicated."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (data_rank - len(sharding.spec))
    return jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(*spec)
    )
  return sharding


def _result(path, name, future):
  try:
    return future.result()
  except Exception as err:  # tensorstore raises ValueError / OSError.
    raise CheckpointError(
      f"checkpoint {path}: array {name!r} cannot be read: {err}"
    ) from err


def _unflatten_paths(saved: list[dict], arrays: list) -> object:
  """Nested dicts / lists from saved key paths (for target=None)."""
  if len(saved) == 1 and not saved[0]["keypath"]:
    return arrays[0]
  root: dict = {}
  for leaf, value in zip(saved, arrays, strict=True):
    node = root
    entries = leaf["keypath"]
    for _, key in entries[:-1]:
      node = node.setdefault(key, {})
    node[entries[-1][1]] = value
  return _lists_for_sequences(root, saved)


def _lists_for_sequences(root: dict, saved: list[dict]):
  """Turns dict levels keyed by sequence indices into lists."""
  seq_prefixes = set()
  for leaf in saved:
    for depth, (entry, _) in enumerate(leaf["keypath"]):
      if entry == "seq":
        seq_prefixes.add(tuple(k for _, k in leaf["keypath"][:depth]))

  def convert(node, prefix):
    if not isinstance(node, dict):
      return node
    children = {k: convert(v, prefix + (k,)) for k, v in node.items()}
    if prefix in seq_prefixes:
      return [children[i] for i in sorted(children)]
    return children

  return convert(root, ())


# ------------------------------------------------------------------ stores
def _step_name(step: int) -> str:
  return f"step_{step:08d}"


def _open_store(directory):
  """A `_KvStore` for a URL string ('scheme://...'), else a `_LocalDir`."""
  if isinstance(directory, str) and "://" in directory:
    return _KvStore(directory)
  return _LocalDir(pathlib.Path(directory).expanduser().resolve())


def _kvstore(location) -> dict:
  """The tensorstore kvstore spec of a local path or a `ts.KvStore.Spec`."""
  if isinstance(location, pathlib.Path):
    return {"driver": "file", "path": str(location)}
  return location.to_json()


def _display(location) -> str:
  """A local path as is, a `ts.KvStore.Spec` as its URL."""
  return str(location) if isinstance(location, pathlib.Path) else location.url


class _LocalDir:
  """A local directory: a save is written to `tmp-<step>-<nonce>/`, fsynced
  and committed by one atomic rename(2) to `step_<n>`.

  Entries are named by their name in the directory; `location(name)` is the
  `pathlib.Path` that the array reads and writes use.
  """

  def __init__(self, root: pathlib.Path):
    self.root = root

  def path(self, name: str) -> pathlib.Path:
    return self.root / name

  location = path

  def entries(self) -> dict[str, bool]:
    """name -> whether it holds COMMIT, for every entry of the directory."""
    if not self.root.is_dir():
      return {}
    return {e.name: (e / COMMIT_FILE).is_file() for e in self.root.iterdir()}

  def exists(self, name: str, file: str) -> bool:
    return (self.root / name / file).is_file()

  def read(self, name: str, file: str) -> bytes:
    return (self.root / name / file).read_bytes()

  def write(self, name: str, file: str, text: str) -> None:
    _write_synced(self.root / name / file, text)

  def staging_name(self, step: int, nonce: str) -> str:
    return f"{_TMP_PREFIX}{step}-{nonce}"

  def begin(self, staging: str) -> None:
    (self.root / staging).mkdir(parents=True)

  def publish(self, staging: str, final: str) -> None:
    """fsyncs `staging`, renames it to `final` (replacing one), fsyncs."""
    tmp, dest = self.root / staging, self.root / final
    _fsync_tree(tmp)
    if dest.exists():
      logging.warning("%s exists; replacing it with the new save.", dest)
      self.discard(final)
    os.rename(tmp, dest)
    _fsync_dir(self.root)

  def discard(self, name: str) -> None:
    """Deletes an entry; a `step_*` one is renamed to a temporary first
    (atomic), so a kill while deleting never leaves a step with missing
    arrays."""
    doomed = self.root / name
    if not name.startswith(_TMP_PREFIX):
      doomed = self.root / f"{_TMP_PREFIX}deleted-{name}-{secrets.token_hex(4)}"
      os.rename(self.root / name, doomed)
      _fsync_dir(self.root)
    shutil.rmtree(doomed, ignore_errors=True)


class _KvStore:
  """A tensorstore kvstore URL (`gs://`, `file://`, `memory://`, ...).

  No atomic directory rename: a save writes its files straight under
  `step_<n>/` and COMMIT last, so a step without COMMIT is incomplete;
  deleting a step removes COMMIT first, then its key range.
  """

  def __init__(self, url: str):
    self.url = url if url.endswith("/") else url + "/"
    self.spec = ts.KvStore.Spec(self.url)
    self.kv = ts.KvStore.open(self.spec, context=CONTEXT).result()

  def path(self, name: str) -> str:
    return self.url + name

  def location(self, name: str) -> ts.KvStore.Spec:
    return self.spec / name

  def entries(self) -> dict[str, bool]:
    """name -> whether it holds COMMIT, for every first key component."""
    names: dict[str, bool] = {}
    for key in self.kv.list().result():
      name, _, rest = key.decode().partition("/")
      names[name] = names.get(name, False) or rest == COMMIT_FILE
    return names

  def exists(self, name: str, file: str) -> bool:
    return self.kv.read(f"{name}/{file}").result().state == "value"

  def read(self, name: str, file: str) -> bytes:
    result = self.kv.read(f"{name}/{file}").result()
    if result.state != "value":
      raise FileNotFoundError(f"{self.path(name)}/{file} does not exist.")
    return result.value

  def write(self, name: str, file: str, text: str) -> None:
    self.kv.write(f"{name}/{file}", text.encode()).result()

  def staging_name(self, step: int, nonce: str) -> str:
    del nonce  # a re-save replaces the step in place
    return _step_name(step)

  def begin(self, staging: str) -> None:
    """Clears `staging` (a complete step of the same number, a leftover)."""
    if self.exists(staging, COMMIT_FILE):
      logging.warning(
        "%s exists; replacing it with the new save.", self.path(staging)
      )
    self.discard(staging)

  def publish(self, staging: str, final: str) -> None:
    del staging, final  # written in place; COMMIT (written last) commits

  def discard(self, name: str) -> None:
    del self.kv[f"{name}/{COMMIT_FILE}"]
    # Every key under "<name>/": "0" is the character after "/".
    self.kv.delete_range(ts.KvStore.KeyRange(f"{name}/", f"{name}0")).result()


# ------------------------------------------------------------ file helpers
def _write_synced(path: pathlib.Path, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_tree(root: pathlib.Path) -> None:
  """fsyncs every directory under `root`, deepest first (entries durable)."""
  for dirpath, _, _ in os.walk(root, topdown=False):
    _fsync_dir(pathlib.Path(dirpath))


# --------------------------------------------------------- multi-process
def _shared_nonce() -> str:
  """A random hex token, the same on every process."""
  nonce = np.frombuffer(secrets.token_bytes(4), np.uint32)
  if jax.process_count() > 1:
    nonce = multihost_utils.broadcast_one_to_all(nonce)
  return f"{int(np.asarray(nonce)[0]):08x}"


def _all_processes_ok(name: str, ok: bool) -> bool:
  """Whether `ok` holds on every process, once all have reached `name`.

  Host-only coordination: the jax distributed client's key-value store and
  barrier (RPCs to the coordination service, as orbax does), never a device
  collective, because this also runs in the background save thread, where a
  device collective could interleave with the training step's collectives
  and deadlock. `name` must be new at every call (it carries a nonce).
  """
  if jax.process_count() == 1:
    return ok
  client = distributed.global_state.client
  client.key_value_set(f"{name}/{jax.process_index()}", str(int(ok)))
  client.wait_at_barrier(name, _BARRIER_TIMEOUT_MS)
  return all(value == "1" for _, value in client.key_value_dir_get(f"{name}/"))


def _on_every_process(name: str, fn) -> None:
  """Runs `fn()` here, then waits for every process at `name`; raises on
  every process when it raised on any."""
  error = None
  try:
    fn()
  except Exception as err:  # re-raised below, after the agreement
    error = err
  if not _all_processes_ok(name, error is None):
    raise error or CheckpointError(f"{name}: failed on another process.")
