r"""Checkpoint save / restore, the caller's stall of a save, data batches.

Checkpoint figures are also given relative to a plain `np.save` + fsync
(save) and `np.load` (restore) of the same bytes in the same run, so a noisy
or slow disk can still be compared. The stall table times how long the
caller is blocked by `save` vs `save_async` for train states (params + two
Adam moments, fp32) of the default model and multiples of it, with the work
of the steps until the next checkpoint overlapping the background write.
Data figures are given relative to raw numpy slicing of the same windows
from an in-memory array.

Usage (from the repository root):
  JAX_NUM_CPU_DEVICES=8 python -m tools.bench_checkpoint
  python -m tools.bench_checkpoint --size_mb=256 --leaves=64
  JAX_NUM_CPU_DEVICES=8 python -m tools.bench_checkpoint --tables=stall
"""

import functools
import math
import os
import pathlib
import shutil
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from lightning_jax import models
from lightning_jax import training
from tools import benchlib

_TABLES = ("checkpoint", "stall", "data")

_SIZE_MB = flags.DEFINE_integer("size_mb", 64, "Checkpoint size (fp32 MB).")
_LEAVES = flags.DEFINE_integer("leaves", 32, "Number of leaves (equal size).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median).")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch of the data table.")
_SEQ = flags.DEFINE_integer(
  "seq_len", 256, "Sequence length of the data table."
)
_TABLES_FLAG = flags.DEFINE_multi_enum(
  "tables", list(_TABLES), list(_TABLES), "Tables to print (repeatable)."
)
_STALL_SCALES = flags.DEFINE_list(
  "stall_scales",
  ["1", "10"],
  "Train-state sizes of the stall table, in multiples of the tiny-hybrid "
  "state (params + two Adam moments, fp32).",
)
_WORK_FACTOR = flags.DEFINE_float(
  "work_factor",
  4.0,
  "Stall table: the steps' work between two checkpoints lasts this many "
  "sync saves (the background write shares this machine's cores with it).",
)
_STALL_PRESET = flags.DEFINE_string(
  "stall_preset", "tiny-hybrid", "Model preset whose train state is saved."
)
_DIR = flags.DEFINE_string(
  "dir",
  None,
  "Scratch directory (default: a new temporary directory, removed afterwards).",
)


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _tree(mesh, nbytes: int, leaves: int):
  """`leaves` fp32 [rows, 256] arrays (about `nbytes` in all), rows sharded
  over every device."""
  devices = mesh.devices.size
  rows = max(devices, nbytes // (4 * 256 * leaves) // devices * devices)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  make = jax.jit(
    lambda k: jax.random.normal(k, (rows, 256)), out_shardings=sharding
  )
  return {f"layer_{i:03d}": make(jax.random.key(i)) for i in range(leaves)}


def _np_save_all(host: dict, directory: pathlib.Path) -> None:
  for name, value in host.items():
    with open(directory / f"{name}.npy", "wb") as f:
      np.save(f, value)
      f.flush()
      os.fsync(f.fileno())


def checkpoint_rows(scratch: pathlib.Path) -> list[dict]:
  """Save / restore seconds and MB/s, and ratios to plain numpy files."""
  mesh = jax.make_mesh(
    (jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  tree = _tree(mesh, _SIZE_MB.value * 2**20, _LEAVES.value)
  mb = sum(x.nbytes for x in tree.values()) / 2**20
  host = {k: np.asarray(v) for k, v in tree.items()}
  ref = scratch / "npy"
  ref.mkdir()
  npy_save = _median_seconds(lambda: _np_save_all(host, ref), _REPEATS.value)
  npy_load = _median_seconds(
    lambda: [np.load(ref / f"{k}.npy") for k in host], _REPEATS.value
  )

  mgr = training.CheckpointManager(scratch / "ckpt", keep=1)
  steps = iter(range(10**6))
  save = _median_seconds(lambda: mgr.save(next(steps), tree), _REPEATS.value)

  def target(spec):
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
      for k, v in tree.items()
    }

  same = target(jax.sharding.PartitionSpec("d"))
  replicated = target(jax.sharding.PartitionSpec())
  restores = {
    "restore (same sharding)": lambda: jax.block_until_ready(
      mgr.restore(None, same)[0]
    ),
    "restore (replicated)": lambda: jax.block_until_ready(
      mgr.restore(None, replicated)[0]
    ),
    "restore (numpy, target=None)": lambda: mgr.restore(None),
  }
  rows = [
    dict(
      op="save",
      mb=mb,
      seconds=save,
      mb_per_s=mb / save,
      vs_numpy=save / npy_save,
    )
  ]
  for name, fn in restores.items():
    seconds = _median_seconds(fn, _REPEATS.value)
    rows.append(
      dict(
        op=name,
        mb=mb,
        seconds=seconds,
        mb_per_s=mb / seconds,
        vs_numpy=seconds / npy_load,
      )
    )
  rows.append(
    dict(
      op="np.save + fsync (reference)",
      mb=mb,
      seconds=npy_save,
      mb_per_s=mb / npy_save,
      vs_numpy=1.0,
    )
  )
  rows.append(
    dict(
      op="np.load (reference)",
      mb=mb,
      seconds=npy_load,
      mb_per_s=mb / npy_load,
      vs_numpy=1.0,
    )
  )
  return rows


def _train_state_shape(preset: str) -> tuple[int, int]:
  """(fp32 bytes, leaves) of params + two Adam moments of `preset`."""
  cfg = models.get_preset(preset)
  params = jax.eval_shape(
    functools.partial(models.init, cfg=cfg), jax.random.key(0)
  )
  return 3 * 4 * models.num_params(cfg), 3 * len(jax.tree.leaves(params))


def _step_work(seconds: float):
  """A function running jitted matmuls for about `seconds` (the training
  steps until the next checkpoint)."""
  x = jnp.ones((512, 512), jnp.float32)
  matmul = jax.jit(lambda a: jnp.tanh(a @ a) * 0.5)
  calls = math.ceil(seconds / benchlib.time_fn(matmul, x, repeats=5))

  def work():
    y = x
    for _ in range(calls):
      y = matmul(y)
    jax.block_until_ready(y)

  return work


def _stalls(save, work, repeats: int) -> tuple[list, list]:
  """Caller seconds in each `save()` and in the `work()` after it."""
  stalls, works = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    save()
    stalls.append(time.perf_counter() - start)
    start = time.perf_counter()
    work()
    works.append(time.perf_counter() - start)
  return stalls, works


def _stall_row(tree, directory: pathlib.Path) -> dict:
  """Stalls of `save` and of `save_async` + the steps' work for `tree`."""
  mgr = training.CheckpointManager(directory, keep=2)
  steps = iter(range(10**6))
  mgr.save(next(steps), tree)  # warm-up
  sync, _ = _stalls(
    lambda: mgr.save(next(steps), tree), lambda: None, _REPEATS.value
  )
  work = _step_work(_WORK_FACTOR.value * float(np.median(sync)))
  _, alone = _stalls(lambda: None, work, _REPEATS.value)
  writes, waits = [], []

  def save_async():
    start = time.perf_counter()
    stats = mgr.wait()  # save_async would wait for it too: part of the stall
    waits.append(time.perf_counter() - start)
    mgr.save_async(next(steps), tree)
    writes.extend([stats.write_s] if stats else [])

  async_, overlapped = _stalls(save_async, work, _REPEATS.value)
  writes.append(mgr.wait().write_s)
  mgr.close()
  return dict(
    mb=sum(x.nbytes for x in tree.values()) / 2**20,
    leaves=len(tree),
    save_stall_s=float(np.median(sync)),
    save_async_stall_s=float(np.median(async_)),
    stall_ratio=float(np.median(sync) / np.median(async_)),
    of_which_wait_s=float(np.median(waits)),
    background_write_s=float(np.median(writes)),
    work_s=float(np.median(alone)),
    work_s_overlapped=float(np.median(overlapped)),
  )


def stall_rows(scratch: pathlib.Path) -> list[dict]:
  """The caller's stall of `save` vs `save_async` (then the steps' work,
  overlapping the background write), per train-state size."""
  mesh = jax.make_mesh(
    (jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  nbytes, leaves = _train_state_shape(_STALL_PRESET.value)
  return [
    dict(
      state=f"{scale}x {_STALL_PRESET.value}",
      **_stall_row(
        _tree(mesh, int(float(scale) * nbytes), leaves),
        scratch / f"stall_{scale}",
      ),
    )
    for scale in _STALL_SCALES.value
  ]


def data_rows(scratch: pathlib.Path) -> list[dict]:
  """batch() per second for each source, vs raw numpy window slicing."""
  tokens = np.frombuffer(training.data.load_corpus(), np.uint8).astype(
    np.uint16
  )
  np.save(scratch / "tokens.npy", tokens)
  store = ts.open(
    {
      "driver": "zarr3",
      "kvstore": {"driver": "file", "path": str(scratch / "tokens.zarr")},
    },
    create=True,
    dtype=ts.uint16,
    shape=tokens.shape,
    chunk_layout=ts.ChunkLayout(chunk_shape=[65536]),
  ).result()
  store.write(tokens).result()
  b, t = _BATCH.value, _SEQ.value
  starts = np.random.default_rng(0).integers(0, len(tokens) - t - 1, b)
  raw = (
    _median_seconds(
      lambda: [tokens[starts[:, None] + np.arange(t + 1)] for _ in range(100)],
      _REPEATS.value,
    )
    / 100
  )
  rows = []
  for spec in (
    "corpus",
    str(scratch / "tokens.npy"),
    str(scratch / "tokens.zarr"),
    "mqar",
  ):
    ds = training.make_dataset(spec, seq_len=t, global_batch_size=b, seed=0)
    seconds = (
      _median_seconds(
        lambda ds=ds: [ds.batch(i) for i in range(100)], _REPEATS.value
      )
      / 100
    )
    rows.append(
      dict(
        source=pathlib.Path(spec).name,
        ms_per_batch=seconds * 1e3,
        tokens_per_s=b * t / seconds,
        vs_raw_slicing=seconds / raw,
      )
    )
  return rows


def main(argv):
  del argv
  scratch_root = pathlib.Path(
    _DIR.value or tempfile.mkdtemp(prefix="bench_checkpoint_")
  )
  scratch_root.mkdir(parents=True, exist_ok=True)
  tables = {
    "checkpoint": checkpoint_rows,
    "stall": stall_rows,
    "data": data_rows,
  }
  try:
    print(
      f"{jax.device_count()} devices, {_LEAVES.value} leaves; data: "
      f"batch {_BATCH.value} x seq {_SEQ.value}"
    )
    for name in _TABLES_FLAG.value:
      print(benchlib.markdown_table(tables[name](scratch_root)))
      print()
  finally:
    if _DIR.value is None:
      shutil.rmtree(scratch_root, ignore_errors=True)


if __name__ == "__main__":
  jax.config.update(
    "jax_num_cpu_devices", int(os.environ.get("JAX_NUM_CPU_DEVICES", "1"))
  )
  app.run(main)
