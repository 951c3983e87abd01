r"""Checkpoint save / restore and data-batch throughput.

Checkpoint figures are also given relative to a plain `np.save` + fsync
(save) and `np.load` (restore) of the same bytes in the same run, so a noisy
or slow disk can still be compared. Data figures are given relative to raw
numpy slicing of the same windows from an in-memory array.

Usage (from the repository root):
  JAX_NUM_CPU_DEVICES=8 python -m tools.bench_checkpoint
  python -m tools.bench_checkpoint --size_mb=256 --leaves=64
"""

import os
import pathlib
import shutil
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np
import tensorstore as ts

from lightning_jax import training
from tools import benchlib

_SIZE_MB = flags.DEFINE_integer("size_mb", 64, "Checkpoint size (fp32 MB).")
_LEAVES = flags.DEFINE_integer("leaves", 32, "Number of leaves (equal size).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median).")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch of the data table.")
_SEQ = flags.DEFINE_integer(
  "seq_len", 256, "Sequence length of the data table."
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


def _tree(mesh, size_mb: int, leaves: int):
  """`leaves` fp32 [rows, 256] arrays, rows sharded over every device."""
  devices = mesh.devices.size
  rows = max(
    devices, size_mb * 2**20 // (4 * 256 * leaves) // devices * devices
  )
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
  tree = _tree(mesh, _SIZE_MB.value, _LEAVES.value)
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
  try:
    print(
      f"{jax.device_count()} devices, {_LEAVES.value} leaves; data: "
      f"batch {_BATCH.value} x seq {_SEQ.value}"
    )
    print(benchlib.markdown_table(checkpoint_rows(scratch_root)))
    print()
    print(benchlib.markdown_table(data_rows(scratch_root)))
  finally:
    if _DIR.value is None:
      shutil.rmtree(scratch_root, ignore_errors=True)


if __name__ == "__main__":
  jax.config.update(
    "jax_num_cpu_devices", int(os.environ.get("JAX_NUM_CPU_DEVICES", "1"))
  )
  app.run(main)
