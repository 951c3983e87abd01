"""A tiny sharded training run, in-process or as one of several processes.

`python -m tests.parallel.distributed_worker --coordinator 127.0.0.1:PORT
--num_processes 2 --process_id I` joins a CPU job of 4 devices per process,
runs `train` on the global mesh and prints one JSON line per step; with
`--die_after_step N` process 1 exits abruptly after step N, and the others
must fail (not hang) on their next collective.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import parallel

MESH = "data=2,fsdp=2,tensor=2"
D, F, BATCH = 16, 32, 8


def _init(key):
  k1, k2 = jax.random.split(key)
  return {
    "w_up": jax.random.normal(k1, (D, F)) / D**0.5,
    "w_down": jax.random.normal(k2, (F, D)) / F**0.5,
  }


def _step(params, batch):
  def loss_fn(p):
    h = jax.nn.relu(batch["x"] @ p["w_up"]) @ p["w_down"]
    return jnp.mean((h - batch["y"]) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  return jax.tree.map(lambda w, g: w - 0.2 * g, params, grads), {"loss": loss}


def _batch(step, sharding):
  """The global batch of `step`; each process builds only its own shards."""
  rng = np.random.default_rng(step)
  arrays = {
    "x": rng.normal(size=(BATCH, D)).astype(np.float32),
    "y": rng.normal(size=(BATCH, D)).astype(np.float32),
  }
  return {
    k: jax.make_array_from_callback(a.shape, sharding, a.__getitem__)
    for k, a in arrays.items()
  }


def train(
  steps: int, die_after_step: int | None = None, report=lambda step, loss: None
) -> list[float]:
  """Losses of `steps` sharded steps over all devices of all processes."""
  mesh = parallel.make_mesh(MESH)
  params = parallel.init_sharded(_init, jax.random.key(0), mesh)
  shardings = jax.tree.map(lambda x: x.sharding, params)
  rows = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(("data", "fsdp"))
  )
  step = parallel.shard_step(_step, mesh, shardings, rows)
  losses = []
  for i in range(steps):
    params, metrics = step(params, _batch(i, rows))
    losses.append(float(metrics["loss"].addressable_data(0)))
    report(i, losses[-1])
    if i == die_after_step and jax.process_index() == 1:
      os._exit(17)  # no shutdown handshake: a crashed host
  return losses


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator", required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--die_after_step", type=int, default=None)
  parser.add_argument("--heartbeat_timeout", type=int, default=30)
  args = parser.parse_args(argv)
  parallel.initialize_distributed(
    args.coordinator,
    args.num_processes,
    args.process_id,
    local_cpu_devices=4,
    heartbeat_timeout_seconds=args.heartbeat_timeout,
    initialization_timeout=60,
    shutdown_timeout_seconds=10,
  )
  report = lambda step, loss: print(
    json.dumps(
      {
        "process": jax.process_index(),
        "devices": jax.device_count(),
        "step": step,
        "loss": loss,
      }
    ),
    flush=True,
  )
  train(args.steps, args.die_after_step, report)


if __name__ == "__main__":
  main(sys.argv[1:])
