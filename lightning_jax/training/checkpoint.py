"""Atomic, sharded pytree checkpoints with tensorstore (zarr v3).

On disk (`docs/checkpoints_and_data.md` has the details):

  <directory>/step_00000120/
      metadata.json         step, format, every leaf (path, shape, dtype,
                            kind), the caller's metadata
      arrays/<leaf path>/   one zarr3 array per leaf (chunk = one shard,
                            crc32c checksum per chunk)
      COMMIT                written last; a step without it is incomplete

Protocol of `save`: every process writes the chunks of its addressable
shards (replica 0 only) into `<directory>/tmp-<step>-<nonce>/`; a barrier;
process 0 writes `metadata.json` and `COMMIT`, fsyncs, and renames the
directory to `step_<step:08d>` (one atomic rename), then prunes to the last
`keep` steps and removes leftovers of interrupted saves; a second barrier.
A kill at any point leaves either the previous complete steps or the new
complete step, never a half-written `step_*` directory that looks complete.

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
"""

import json
import os
import pathlib
import re
import secrets
import shutil
from typing import NamedTuple
import urllib.parse

from absl import logging
import jax
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


class CheckpointManager:
  """Saves and restores pytrees of arrays as numbered, atomic checkpoints.

  Args:
    directory: where `step_<n>` directories live (created if missing).
    keep: how many most recent complete steps to keep (>= 1).
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
      raise ValueError(f"`keep` must be an int >= 1, got {keep!r}.")
    self.directory = pathlib.Path(directory).expanduser().resolve()
    self.keep = keep
    self._warned: set[str] = set()

  # ----------------------------------------------------------------- listing
  def step_path(self, step: int) -> pathlib.Path:
    """The directory of complete step `step` (whether or not it exists)."""
    return self.directory / f"step_{step:08d}"

  def all_steps(self) -> list[int]:
    """Complete steps in increasing order; warns about incomplete ones."""
    if not self.directory.is_dir():
      return []
    steps = []
    for entry in sorted(self.directory.iterdir()):
      match = _STEP_RE.match(entry.name)
      if match and (entry / COMMIT_FILE).is_file():
        steps.append(int(match.group(1)))
      elif match or entry.name.startswith(_TMP_PREFIX):
        self._warn_once(
          entry,
          "incomplete checkpoint ignored (no COMMIT "
          "marker; an interrupted save?)",
        )
    return sorted(steps)

  def latest_step(self) -> int | None:
    """The newest complete step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _warn_once(self, path: pathlib.Path, message: str) -> None:
    if str(path) not in self._warned:
      self._warned.add(str(path))
      logging.warning("%s: %s", path, message)

  # -------------------------------------------------------------------- save
  def save(self, step: int, tree, metadata: dict | None = None) -> pathlib.Path:
    """Writes `tree` as complete step `step`, atomically; collective.

    Every process must call it with the same step and tree structure.

    Args:
      step: non-negative int.
      tree: pytree of jax.Arrays (any sharding, possibly spanning processes),
        numpy arrays or Python scalars (written by process 0), or a
        `Snapshot` of one taken earlier.
      metadata: JSON-serialisable dict stored beside the arrays.

    Returns:
      The committed step directory.
    """
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
    leaves = tree.leaves if isinstance(tree, Snapshot) else _flatten(tree)
    primary = jax.process_index() == 0
    self.directory.mkdir(parents=True, exist_ok=True)
    tmp = self.directory / f"{_TMP_PREFIX}{step}-{_shared_nonce()}"
    if primary:
      self._remove_leftovers(keep_tmp=tmp)
      tmp.mkdir()
    _barrier(f"lightning_jax_ckpt_mkdir_{step}")
    _write_leaves(tmp / ARRAYS_DIR, leaves, primary)
    _barrier(f"lightning_jax_ckpt_written_{step}")
    final = self.step_path(step)
    if primary:
      record = {
        "format": FORMAT,
        "step": step,
        "leaves": [leaf.record() for leaf in leaves],
        "metadata": json.loads(user_json),
      }
      _write_synced(tmp / METADATA_FILE, json.dumps(record, indent=1))
      _write_synced(tmp / COMMIT_FILE, f"{step}\n")
      _fsync_tree(tmp)
      if final.exists():
        logging.warning("%s exists; replacing it with the new save.", final)
        _discard(final)
      os.rename(tmp, final)
      _fsync_dir(self.directory)
      self._prune()
    _barrier(f"lightning_jax_ckpt_committed_{step}")
    return final

  def _remove_leftovers(self, keep_tmp: pathlib.Path) -> None:
    """Process 0: deletes temporaries and step dirs without COMMIT."""
    for entry in self.directory.iterdir():
      incomplete = (
        _STEP_RE.match(entry.name) and not (entry / COMMIT_FILE).is_file()
      )
      if entry != keep_tmp and (
        entry.name.startswith(_TMP_PREFIX) or incomplete
      ):
        logging.warning("%s: removing an incomplete checkpoint.", entry)
        shutil.rmtree(entry, ignore_errors=True)

  def _prune(self) -> None:
    """Process 0: keeps the newest `keep` complete steps."""
    for step in self.all_steps()[: -self.keep]:
      _discard(self.step_path(step))

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

    The processes agree (an all-gather of success flags), so that all of them
    fall back or raise together, even when only one read a corrupt chunk.
    """
    try:
      result, error = self._restore_step(step, target, partial), None
    except CheckpointError as err:
      result, error = None, err
    if _all_processes_ok(error is None):
      logging.info("Restored checkpoint %s.", self.step_path(step))
      return result, None
    return None, error or CheckpointError(
      f"{self.step_path(step)}: another process failed to read it."
    )

  def _restore_step(self, step: int, target, partial: bool):
    path = self.step_path(step)
    if not (path / COMMIT_FILE).is_file():
      raise CheckpointError(f"{path}: no complete checkpoint for step {step}.")
    try:
      record = json.loads((path / METADATA_FILE).read_text())
    except (OSError, ValueError) as err:
      raise CheckpointError(
        f"{path}: unreadable {METADATA_FILE}: {err}"
      ) from err
    _check_record(path, record)
    saved = record["leaves"]
    if target is None:  # Raw numpy, keys included (as their key data).
      arrays = _read_leaves(path, saved, [None] * len(saved))
      return _unflatten_paths(saved, arrays), record["metadata"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    records = _check_target(path, saved, flat, partial)
    arrays = _read_leaves(path, records, [leaf for _, leaf in flat])
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


def _zarr_spec(path: pathlib.Path, shape=None, dtype=None, chunks=None) -> dict:
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
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


def _write_leaves(root: pathlib.Path, leaves: list[_Leaf], primary: bool):
  """Writes this process's pieces of every leaf; waits for all writes."""
  # Process 0 creates each array's zarr.json; the others assume it.
  opened = [
    ts.open(
      _zarr_spec(root / leaf.name, leaf.shape, leaf.dtype, leaf.chunks),
      create=primary,
      open=not primary,
      assume_metadata=not primary,
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


def _read_leaves(path: pathlib.Path, records: list[dict], targets: list):
  """Reads leaves `records[i]` onto `targets[i]` (None -> a numpy array).

  All reads are issued before any is awaited; each process reads only the
  index domains of its addressable devices (each domain once).
  """
  opened = [
    ts.open(_zarr_spec(path / ARRAYS_DIR / leaf["path"]), open=True, read=True)
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


def _discard(path: pathlib.Path) -> None:
  """Removes a step dir: first renamed to a temporary (atomic), then deleted."""
  doomed = (
    path.parent / f"{_TMP_PREFIX}deleted-{path.name}-{secrets.token_hex(4)}"
  )
  os.rename(path, doomed)
  _fsync_dir(path.parent)
  shutil.rmtree(doomed, ignore_errors=True)


# --------------------------------------------------------- multi-process
def _shared_nonce() -> str:
  """A random hex token, the same on every process."""
  nonce = np.frombuffer(secrets.token_bytes(4), np.uint32)
  if jax.process_count() > 1:
    nonce = multihost_utils.broadcast_one_to_all(nonce)
  return f"{int(np.asarray(nonce)[0]):08x}"


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _all_processes_ok(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.array([ok], np.bool_))
  return bool(np.all(flags))
