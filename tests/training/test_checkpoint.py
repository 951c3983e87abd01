"""Checkpoints: bitwise roundtrip, atomic commit, keep-N, corruption,
reshard."""

import json
import logging
import os
import pathlib
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import tensorstore as ts

from lightning_jax import training
from lightning_jax.training import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _tree(step=0):
  """Leaves of every kind: sharded fp32 with NaN/inf, bf16, ints, scalars,
  keys."""
  mesh = _mesh((8,), ("data",))
  w = np.arange(64, dtype=np.float32).reshape(16, 4) + step
  w[0, :3] = [np.nan, np.inf, -0.0]
  return {
    "params": {
      "w": jax.device_put(w, NamedSharding(mesh, P("data"))),
      "b": jnp.linspace(-1, 1, 6, dtype=jnp.bfloat16) + step,
    },
    "layers": (
      {"scale": jnp.full((3,), step, jnp.int32)},
      {"scale": np.arange(4, dtype=np.int8)},
    ),
    "step": jnp.asarray(step, jnp.int32),
    "count": step,  # a Python scalar
    "rng": jax.random.key(step),
    "raw_rng": jax.random.PRNGKey(7),
    "empty": jnp.zeros((0, 3), jnp.float32),
  }


def _abstract(tree, sharding_for=lambda leaf: getattr(leaf, "sharding", None)):
  def leaf_struct(leaf):
    dtype = (
      leaf.dtype if isinstance(leaf, jax.Array) else np.asarray(leaf).dtype
    )
    return jax.ShapeDtypeStruct(
      np.shape(leaf), dtype, sharding=sharding_for(leaf)
    )

  return jax.tree.map(leaf_struct, tree)


def _bits(x):
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
    x.dtype, jax.dtypes.prng_key
  ):
    x = jax.random.key_data(x)
  x = np.asarray(x)
  return x.dtype, x.shape, x.tobytes()


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert _bits(x) == _bits(y)


def test_roundtrip_is_bitwise_with_the_same_shardings(tmp_path):
  tree = _tree(3)
  mgr = training.CheckpointManager(tmp_path / "ckpt")
  path = mgr.save(3, tree, metadata={"model_config": {"d": 8}, "note": "x"})
  assert path == mgr.step_path(3) and (path / checkpoint.COMMIT_FILE).is_file()
  restored, metadata = mgr.restore(3, _abstract(tree))
  assert metadata == {"model_config": {"d": 8}, "note": "x"}
  _assert_bitwise(restored, tree)
  assert restored["params"]["w"].sharding == tree["params"]["w"].sharding
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  assert str(jax.random.key_impl(restored["rng"])) == str(
    jax.random.key_impl(tree["rng"])
  )
  # Leaves with no sharding in the target come back as numpy arrays.
  assert isinstance(restored["layers"][1]["scale"], np.ndarray)
  # The same key stream continues after restore.
  np.testing.assert_array_equal(
    jax.random.uniform(restored["rng"], (4,)),
    jax.random.uniform(tree["rng"], (4,)),
  )


def test_restore_without_target_gives_a_numpy_tree(tmp_path):
  tree = _tree(1)
  mgr = training.CheckpointManager(tmp_path)
  mgr.save(1, tree)
  host, metadata = mgr.restore(None)
  assert metadata == {}
  assert sorted(host) == sorted(tree)
  assert isinstance(host["layers"], list) and len(host["layers"]) == 2
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
  np.testing.assert_array_equal(host["rng"], jax.random.key_data(tree["rng"]))
  assert _bits(host["params"]["w"]) == _bits(tree["params"]["w"])
  assert host["params"]["b"].dtype == jnp.bfloat16


def test_replicated_leaf_is_written_once_and_shards_are_chunks(tmp_path):
  mesh = _mesh((2, 4), ("data", "fsdp"))
  tree = {
    "rep": jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P())),
    "half": jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("data"))),
  }
  path = training.CheckpointManager(tmp_path).save(0, tree)
  chunks = lambda name: sorted(
    p.name for p in (path / checkpoint.ARRAYS_DIR / name).glob("c.*")
  )
  assert chunks("rep") == ["c.0"]
  assert chunks("half") == ["c.0", "c.1"]


def test_keeps_the_last_n_steps(tmp_path):
  mgr = training.CheckpointManager(tmp_path, keep=2)
  assert mgr.all_steps() == [] and mgr.latest_step() is None
  tree = {"x": jnp.arange(3)}
  for step in (0, 10, 20, 30):
    mgr.save(step, tree)
  assert mgr.all_steps() == [20, 30] and mgr.latest_step() == 30
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    "step_00000020",
    "step_00000030",
  ]
  with pytest.raises(ValueError, match="keep"):
    training.CheckpointManager(tmp_path, keep=0)


def test_incomplete_checkpoints_are_ignored_and_cleaned(tmp_path, caplog):
  mgr = training.CheckpointManager(tmp_path)
  mgr.save(1, _tree(1))
  mgr.save(2, _tree(2))
  # A save killed before its rename, and a step whose COMMIT is missing.
  (tmp_path / "tmp-3-deadbeef" / "arrays").mkdir(parents=True)
  (mgr.step_path(2) / checkpoint.COMMIT_FILE).unlink()
  with caplog.at_level(logging.WARNING):
    assert mgr.all_steps() == [1]
  warned = " ".join(r.getMessage() for r in caplog.records)
  assert "tmp-3-deadbeef" in warned and "step_00000002" in warned
  assert "incomplete" in warned
  restored, _ = mgr.restore(None, _abstract(_tree(1)))
  _assert_bitwise(restored, _tree(1))
  with pytest.raises(training.CheckpointError, match="step_00000002"):
    mgr.restore(2, _abstract(_tree(2)))
  mgr.save(4, _tree(4))  # process 0 cleans up at the next save
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    "step_00000001",
    "step_00000004",
  ]


def test_corrupt_array_names_it_and_restore_falls_back(tmp_path, caplog):
  mgr = training.CheckpointManager(tmp_path)
  for step in (1, 2):
    mgr.save(step, _tree(step))
  chunk = mgr.step_path(2) / checkpoint.ARRAYS_DIR / "params" / "w" / "c.3.0"
  data = bytearray(chunk.read_bytes())
  data[5] ^= 0x40  # one flipped bit: caught by the crc32c codec
  chunk.write_bytes(bytes(data))
  target = _abstract(_tree(2))
  with pytest.raises(
    training.CheckpointError, match=r"step_00000002.*'params/w'"
  ):
    mgr.restore(2, target)
  with caplog.at_level(logging.ERROR):
    restored, _ = mgr.restore(None, target)
  _assert_bitwise(restored, _tree(1))
  errors = " ".join(
    r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
  )
  assert "step_00000002" in errors and "params/w" in errors
  # A missing chunk file is an error too, not silently the fill value.
  chunk.unlink()
  with pytest.raises(training.CheckpointError, match="'params/w'"):
    mgr.restore(2, target)


@pytest.mark.parametrize(
  "record",
  [{}, [], {"format": "other/1"}, {"format": checkpoint.FORMAT}],
)
def test_metadata_of_the_wrong_layout_falls_back(tmp_path, record):
  mgr = training.CheckpointManager(tmp_path)
  for step in (1, 2):
    mgr.save(step, _tree(step))
  (mgr.step_path(2) / checkpoint.METADATA_FILE).write_text(json.dumps(record))
  with pytest.raises(training.CheckpointError, match="step_00000002"):
    mgr.restore(2, None)
  restored, _ = mgr.restore(None, _abstract(_tree(2)))
  _assert_bitwise(restored, _tree(1))


@pytest.mark.parametrize(
  "shape,names,spec",
  [
    ((2, 4), ("data", "fsdp"), P(("data", "fsdp"))),
    ((2, 4), ("data", "fsdp"), P("fsdp", "data")),
    ((2, 4), ("data", "fsdp"), P()),
    ((4, 2), ("data", "tensor"), P(None, "tensor")),
  ],
)
def test_reshard_on_read(tmp_path, shape, names, spec):
  tree = _tree(5)
  training.CheckpointManager(tmp_path).save(5, tree)
  mesh = _mesh(shape, names)

  def sharding_for(leaf):
    if not isinstance(leaf, jax.Array):
      return None  # host leaves stay host leaves
    if np.ndim(leaf) == 2 and np.shape(leaf)[0] == 16:
      return NamedSharding(mesh, spec)
    return NamedSharding(mesh, P())  # keys and scalars: replicated

  restored, _ = training.CheckpointManager(tmp_path).restore(
    None, _abstract(tree, sharding_for)
  )
  w = restored["params"]["w"]
  assert w.sharding == NamedSharding(mesh, spec)
  _assert_bitwise(restored, tree)
  for shard in w.addressable_shards:
    assert shard.data.shape == w.sharding.shard_shape(w.shape)


_GRID_AXES = (("a", 2), ("b", 4))


def _spec(draw, shape):
  """A PartitionSpec for `shape` over the (a=2, b=4) grid: each axis used at
  most once, only on dims it divides."""
  free, spec = dict(_GRID_AXES), []
  for dim in shape:
    options = [None] + [name for name, size in free.items() if dim % size == 0]
    if len(free) == 2 and dim % 8 == 0:
      options.append(("a", "b"))
    choice = draw(st.sampled_from(options))
    for name in choice if isinstance(choice, tuple) else (choice,):
      free.pop(name, None)
    spec.append(choice)
  return P(*spec)


@hypothesis.settings(max_examples=10)
@hypothesis.given(data=st.data())
def test_any_layout_roundtrips_onto_any_layout(tmp_path_factory, data):
  """Property: random shape / dtype / save sharding / restore sharding."""
  shape = tuple(
    data.draw(
      st.lists(st.sampled_from([1, 2, 4, 8, 16]), max_size=3), label="shape"
    )
  )
  dtype = data.draw(
    st.sampled_from(["float32", "bfloat16", "int8", "uint32", "bool"]),
    label="dtype",
  )
  grid = _mesh((2, 4), ("a", "b"))
  save_spec = _spec(data.draw, shape)
  load_spec = _spec(data.draw, shape)
  host = np.random.default_rng(len(shape)).standard_normal(shape) * 100
  x = jax.device_put(
    jnp.asarray(host.astype(dtype)), NamedSharding(grid, save_spec)
  )
  mgr = training.CheckpointManager(tmp_path_factory.mktemp("prop"))
  mgr.save(0, {"x": x})
  target = {
    "x": jax.ShapeDtypeStruct(
      shape, x.dtype, sharding=NamedSharding(grid, load_spec)
    )
  }
  restored, _ = mgr.restore(0, target)
  assert restored["x"].sharding == NamedSharding(grid, load_spec)
  assert _bits(restored["x"]) == _bits(x)


def test_partial_restore_reads_a_subtree(tmp_path):
  """E.g. the params out of a saved train state (NamedTuple), for inference."""
  tree = _tree(2)
  mgr = training.CheckpointManager(tmp_path)
  mgr.save(2, tree)
  (
    mgr.step_path(2) / checkpoint.ARRAYS_DIR / "layers" / "0" / "scale" / "c.0"
  ).unlink()  # not read by a partial restore of "params"
  params = _abstract({"params": tree["params"]})
  restored, _ = mgr.restore(2, params, partial=True)
  _assert_bitwise(restored, {"params": tree["params"]})
  with pytest.raises(training.CheckpointError, match="layers/0/scale"):
    mgr.restore(2, _abstract(tree))


def test_target_mismatch_names_the_leaf(tmp_path):
  mgr = training.CheckpointManager(tmp_path)
  mgr.save(0, {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)})
  bad_shape = {
    "a": jax.ShapeDtypeStruct((3, 2), jnp.float32),
    "b": jax.ShapeDtypeStruct((4,), jnp.float32),
  }
  with pytest.raises(ValueError, match="`target` leaf 'a'"):
    mgr.restore(0, bad_shape)
  with pytest.raises(ValueError, match="`target` leaf 'c'"):
    mgr.restore(0, {"c": jax.ShapeDtypeStruct((4,), jnp.float32)})
  with pytest.raises(ValueError, match="lacks leaves.*'b'.*partial=True"):
    mgr.restore(0, {"a": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
  with pytest.raises(training.CheckpointError, match="no complete"):
    training.CheckpointManager(tmp_path / "none").restore(None)
  with pytest.raises(ValueError, match="metadata"):
    mgr.save(1, {"a": jnp.zeros(2)}, metadata={"x": object()})


_SAVER = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from lightning_jax import training

mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
sharding = NamedSharding(mesh, P("data"))
mgr = training.CheckpointManager(sys.argv[1], keep=2)
step = (mgr.latest_step() or 0) + 1
while True:
  tree = {f"w{i}": jax.device_put(jnp.full((64, 256), step * 10 + i,
                                           jnp.float32), sharding)
          for i in range(8)}
  mgr.save(step, tree, metadata={"step": step})
  print(step, flush=True)
  step += 1
"""


def test_sigkill_during_saves_leaves_only_complete_checkpoints(tmp_path):
  """A saver killed at random moments: only complete steps, latest restores."""
  script = tmp_path / "saver.py"
  script.write_text(_SAVER)
  directory = tmp_path / "ckpt"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  rng = random.Random(0)
  for _ in range(3):
    proc = subprocess.Popen(
      [sys.executable, str(script), str(directory)],
      stdout=subprocess.PIPE,
      env=env,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    first = proc.stdout.readline() if ready else b""  # one save done
    if not first:
      proc.kill()
      pytest.fail("the saver died or hung before its first save")
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
  mgr = training.CheckpointManager(directory, keep=2)
  steps = mgr.all_steps()
  assert steps and len(steps) <= 2
  mesh = _mesh((4,), ("data",))
  target = {
    f"w{i}": jax.ShapeDtypeStruct(
      (64, 256), jnp.float32, sharding=NamedSharding(mesh, P())
    )
    for i in range(8)
  }
  for step in steps:
    tree, metadata = mgr.restore(step, target)
    assert metadata == {"step": step}
    for i in range(8):
      np.testing.assert_array_equal(tree[f"w{i}"], step * 10 + i)
  _, metadata = mgr.restore(None, target)
  assert metadata["step"] == steps[-1]


_WORKER = """
import json
import sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                           process_id=process)
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np
from lightning_jax import training

def value(step):
  return np.arange(16, dtype=np.float32).reshape(8, 2) + 100 * step

mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
rows = NamedSharding(mesh, P("data"))  # process 0: rows 0-3, process 1: 4-7
mgr = training.CheckpointManager(directory)
for step in (1, 2):  # in the background, with host-only barriers
  x = jax.make_array_from_callback((8, 2), rows, lambda i: value(step)[i])
  mgr.save_async(step, {"x": x, "rng": jax.random.key(step)}, {"step": step})
mgr.wait()
if process == 0:  # corrupt a chunk that only process 1 reads back
  chunk = mgr.step_path(2) / "arrays" / "x" / "c.3.0"
  chunk.write_bytes(chunk.read_bytes()[:-1] + b"?")
multihost_utils.sync_global_devices("corrupted")
key = jax.random.key(0).dtype
target = {"x": jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=rows),
          "rng": jax.ShapeDtypeStruct((), key,
                                      sharding=NamedSharding(mesh, P()))}
_, fallback = mgr.restore(None, target)
try:
  mgr.restore(2, target)
  explicit = "restored"
except training.CheckpointError:
  explicit = "raised"
grid = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
target["x"] = jax.ShapeDtypeStruct(
    (8, 2), jnp.float32, sharding=NamedSharding(grid, P("fsdp", "data")))
tree, _ = mgr.restore(1, target)
shards = [[str(s.index), bool(np.array_equal(s.data, value(1)[s.index]))]
          for s in tree["x"].addressable_shards]
print(json.dumps({"fallback": fallback["step"], "explicit": explicit,
                  "steps": mgr.all_steps(),
                  "shards": shards}), flush=True)
"""


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def test_two_processes_write_their_shards_and_agree_on_fallback(tmp_path):
  """2 processes (gloo): save_async, a chunk only process 1 reads is corrupt ->
  both fall back to the same step (or both raise for an explicit step); a
  resharded restore across processes."""
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  port = str(_free_port())
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(i), port, str(tmp_path / "ckpt")],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for i in range(2)
  ]
  outputs = []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    assert proc.returncode == 0, err[-3000:]
    outputs.append(json.loads(out.strip().splitlines()[-1]))
  for out in outputs:
    assert out["fallback"] == 1 and out["steps"] == [1, 2]
    assert out["explicit"] == "raised"  # on both processes
    assert len(out["shards"]) == 2 and all(ok for _, ok in out["shards"])
  # Process 0 and 1 hold different blocks of the resharded array.
  assert outputs[0]["shards"] != outputs[1]["shards"]
  host, metadata = training.CheckpointManager(tmp_path / "ckpt").restore(1)
  assert metadata == {"step": 1}
  np.testing.assert_array_equal(
    host["x"], np.arange(16, dtype=np.float32).reshape(8, 2) + 100
  )


# ------------------------------------------------------------ async saves
def _gated_writes(monkeypatch):
  """Makes every `_write_leaves` wait for the returned event (set it to let
  the write go on); `entered` is set once a write is waiting."""
  release, entered = threading.Event(), threading.Event()
  write_leaves = checkpoint._write_leaves

  def gated(root, leaves, primary):
    entered.set()
    assert release.wait(60), "the test never released the write"
    write_leaves(root, leaves, primary)

  monkeypatch.setattr(checkpoint, "_write_leaves", gated)
  return release, entered


def test_save_async_then_restore_is_bitwise_and_records_stats(
  tmp_path, monkeypatch, caplog
):
  tree = _tree(3)
  with training.CheckpointManager(tmp_path) as mgr:
    mgr.save(1, _tree(1))  # sync: the caller waits for the write too
    assert mgr.last_save.step == 1
    assert mgr.last_save.stall_s >= mgr.last_save.write_s > 0
    release, entered = _gated_writes(monkeypatch)
    mgr.save_async(3, tree, metadata={"note": "async"})
    assert entered.wait(60)  # the write runs while this thread goes on
    held = time.perf_counter()
    assert mgr.all_steps() == [1]
    time.sleep(0.3)
    held, _ = time.perf_counter() - held, release.set()
    with caplog.at_level(logging.INFO):
      stats = mgr.wait()
    assert mgr.wait() is None  # nothing pending any more
  assert stats == mgr.last_save
  assert stats.step == 3 and stats.path == mgr.step_path(3)
  assert stats.write_s >= held > stats.stall_s > 0
  logged = " ".join(r.getMessage() for r in caplog.records)
  assert "step_00000003 committed" in logged and "stalled" in logged
  restored, metadata = mgr.restore(None, _abstract(tree))
  assert metadata == {"note": "async"}
  _assert_bitwise(restored, tree)
  # A Snapshot is written as is; leaving the `with` block waits for it.
  with training.CheckpointManager(tmp_path) as mgr:
    mgr.save_async(4, checkpoint.snapshot(_tree(4)))
  _assert_bitwise(mgr.restore(4, _abstract(tree))[0], _tree(4))


def test_save_async_writes_the_values_at_call_time(tmp_path, monkeypatch):
  """The caller may donate / change the arrays once save_async returns."""
  w = jax.device_put(
    jnp.arange(16.0), NamedSharding(_mesh((8,), ("d",)), P("d"))
  )
  host = np.arange(4, dtype=np.int32)
  mgr = training.CheckpointManager(tmp_path)
  release, entered = _gated_writes(monkeypatch)
  mgr.save_async(0, {"w": w, "host": host})
  assert entered.wait(60)  # nothing written yet
  w = jax.jit(lambda x: x * 0 - 1, donate_argnums=0)(w)  # old buffer donated
  host[:] = -1
  release.set()
  mgr.close()
  restored, _ = mgr.restore(0)
  np.testing.assert_array_equal(restored["w"], np.arange(16.0))
  np.testing.assert_array_equal(restored["host"], np.arange(4))


def test_background_error_surfaces_at_wait_or_next_save(tmp_path, monkeypatch):
  mgr = training.CheckpointManager(tmp_path)
  mgr.save(1, _tree(1))
  write_leaves = checkpoint._write_leaves

  def failing(root, leaves, primary):
    write_leaves(root, leaves, primary)
    if "tmp-2-" in str(root) or "tmp-3-" in str(root):
      raise OSError(f"disk full: {root}")  # after writing its bytes

  monkeypatch.setattr(checkpoint, "_write_leaves", failing)
  mgr.save_async(2, _tree(2))  # returns: the failure is in the background
  with pytest.raises(OSError, match="disk full.*tmp-2-"):
    mgr.wait()
  assert mgr.wait() is None  # raised once
  # The failed save's bytes are gone at once, not at the next save.
  assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]
  mgr.save_async(3, _tree(3))
  with pytest.raises(OSError, match="disk full.*tmp-3-"):
    mgr.save_async(4, _tree(4))  # not started
  assert mgr.wait() is None and mgr.all_steps() == [1]
  mgr.save(5, _tree(5))  # cleans the failed saves' leftovers
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    "step_00000001",
    "step_00000005",
  ]


def test_at_most_one_save_in_flight(tmp_path, monkeypatch):
  """save_async of step 2 waits until step 1 has committed."""
  mgr = training.CheckpointManager(tmp_path)
  write_leaves = checkpoint._write_leaves
  seen = []  # (step dir being written, complete steps) at each write

  def recording(root, leaves, primary):
    seen.append((root.parent.name.split("-")[1], mgr.all_steps()))
    write_leaves(root, leaves, primary)

  monkeypatch.setattr(checkpoint, "_write_leaves", recording)
  release, entered = _gated_writes(monkeypatch)
  timer = threading.Timer(0.3, release.set)
  timer.start()
  mgr.save_async(1, _tree(1))
  mgr.save_async(2, _tree(2))  # blocks until step 1 has committed
  assert release.is_set() and mgr.last_save.step == 1
  stats = mgr.wait()
  assert seen == [("1", []), ("2", [1])]
  assert stats.step == 2 and mgr.all_steps() == [1, 2]
  timer.join()


_STORES = ("path", "file://", "memory://")


def _store(kind, tmp_path):
  """(CheckpointManager directory, a raw tensorstore view of its files)."""
  if kind == "memory://":
    url = f"memory://{tmp_path.name}/"
    return url, ts.KvStore.open(url, context=checkpoint.CONTEXT).result()
  raw = ts.KvStore.open({"driver": "file", "path": f"{tmp_path}/"}).result()
  return (str(tmp_path) if kind == "path" else f"file://{tmp_path}/"), raw


def _top_level(raw) -> list[str]:
  return sorted({k.decode().split("/")[0] for k in raw.list().result()})


@pytest.mark.parametrize("kind", _STORES)
def test_stores_save_restore_prune_clean_and_fall_back(tmp_path, kind, caplog):
  """The same observable protocol on a local path, file:// and memory://."""
  directory, raw = _store(kind, tmp_path)
  mgr = training.CheckpointManager(directory, keep=2)
  mgr.save(1, _tree(1))
  mgr.save_async(2, _tree(2), {"step": 2})
  mgr.save(3, _tree(3))
  assert mgr.all_steps() == [2, 3]
  assert _top_level(raw) == ["step_00000002", "step_00000003"]
  assert str(mgr.step_path(3)).endswith("step_00000003")
  restored, metadata = training.CheckpointManager(directory).restore(
    2, _abstract(_tree(2))
  )
  assert metadata == {"step": 2}
  _assert_bitwise(restored, _tree(2))
  # Interrupted saves: a step without COMMIT, a local-protocol temporary.
  raw["step_00000004/arrays/x/zarr.json"] = b"{}"
  raw["step_00000004/metadata.json"] = b"{}"
  raw["tmp-5-deadbeef/arrays/x/c.0"] = b"?"
  with caplog.at_level(logging.WARNING):
    assert mgr.all_steps() == [2, 3]
  warned = " ".join(r.getMessage() for r in caplog.records)
  assert "step_00000004" in warned and "tmp-5-deadbeef" in warned
  # A corrupt chunk in step 3: an explicit restore raises, None falls back.
  key = "step_00000003/arrays/params/w/c.3.0"
  chunk = bytearray(raw[key])
  chunk[5] ^= 0x40
  raw[key] = bytes(chunk)
  with pytest.raises(training.CheckpointError, match=r"00003.*'params/w'"):
    mgr.restore(3, _abstract(_tree(3)))
  restored, _ = mgr.restore(None, _abstract(_tree(3)))
  _assert_bitwise(restored, _tree(2))
  mgr.save(6, _tree(6))  # removes the leftovers, prunes step 2
  assert _top_level(raw) == ["step_00000003", "step_00000006"]
  _assert_bitwise(mgr.restore(None, _abstract(_tree(6)))[0], _tree(6))


def test_file_url_and_plain_path_hold_the_same_checkpoints(tmp_path):
  by_url = training.CheckpointManager(f"file://{tmp_path}/url")
  by_path = training.CheckpointManager(tmp_path / "path")
  for mgr in (by_url, by_path):
    mgr.save(7, _tree(7), {"k": 1})
  files = lambda d: sorted(
    str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()
  )
  assert files(tmp_path / "url") == files(tmp_path / "path")
  # Each reads the other's directory.
  for reader, directory in (
    (training.CheckpointManager(tmp_path / "url"), "url"),
    (training.CheckpointManager(f"file://{tmp_path}/path"), "path"),
  ):
    assert reader.all_steps() == [7], directory
    restored, metadata = reader.restore(None, _abstract(_tree(7)))
    assert metadata == {"k": 1}
    _assert_bitwise(restored, _tree(7))


_ASYNC_SAVER = """
import sys, threading
import jax
jax.config.update("jax_num_cpu_devices", 2)
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from lightning_jax import training
from lightning_jax.training import checkpoint

write_leaves, writes = checkpoint._write_leaves, []

def write_then_hang(root, leaves, primary):  # step 2 never commits
  write_leaves(root, leaves, primary)
  writes.append(root)
  if len(writes) == 2:
    print("written", flush=True)
    threading.Event().wait()

checkpoint._write_leaves = write_then_hang
mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
sharding = NamedSharding(mesh, P("data"))
tree = lambda step: {f"w{i}": jax.device_put(
    jnp.arange(512.0).reshape(32, 16) * step + i, sharding) for i in range(4)}
mgr = training.CheckpointManager(sys.argv[1])
mgr.save(1, tree(1))
mgr.save_async(2, tree(2))
print("returned", flush=True)
x = tree(3)["w0"]
while True:  # the caller goes on computing while step 2 is being written
  x = jnp.sin(x).block_until_ready()
"""


@pytest.mark.parametrize("kind", ["path", "file://"])
def test_sigkill_during_a_background_save(tmp_path, kind):
  """Killed while save_async's thread writes step 2 (the caller computing):
  step 1 restores bitwise, the half-written step 2 is not complete."""
  script = tmp_path / "saver.py"
  script.write_text(_ASYNC_SAVER)
  directory = tmp_path / "ckpt"
  url = str(directory) if kind == "path" else f"file://{directory}/"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
    [sys.executable, str(script), url], stdout=subprocess.PIPE, env=env
  )
  lines = set()
  try:
    while lines != {b"returned\n", b"written\n"}:
      ready, _, _ = select.select([proc.stdout], [], [], 120)
      line = proc.stdout.readline() if ready else b""
      assert line, "the saver died or hung before step 2 was half written"
      lines.add(line)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
  complete, half = sorted(p.name for p in directory.iterdir())
  assert complete == "step_00000001"
  assert half.startswith("tmp-2-" if kind == "path" else "step_00000002")
  assert (directory / half / "arrays").is_dir()
  assert not (directory / half / checkpoint.COMMIT_FILE).exists()
  mgr = training.CheckpointManager(url)
  assert mgr.all_steps() == [1]
  mesh = _mesh((2,), ("data",))
  target = {
    f"w{i}": jax.ShapeDtypeStruct(
      (32, 16), jnp.float32, sharding=NamedSharding(mesh, P("data"))
    )
    for i in range(4)
  }
  restored, _ = mgr.restore(None, target)
  for i in range(4):
    np.testing.assert_array_equal(
      restored[f"w{i}"], np.arange(512.0).reshape(32, 16) + i
    )
