"""Pipeline schedules: step time vs microbatches and compiled peak memory.

S stages on 8 fake CPU devices (mesh data=8/S, pipe=S), a fixed microbatch
size, M microbatches: for gpipe, circular (R=2) and 1f1b, the jitted
`pipeline_grad_fn` step time, time per microbatch next to the theoretical
bubble `(S-1)/(RM+S-1)`, and the compiled temp memory (`memory_analysis()`,
per device) as M grows.

  python -m tools.bench_pipeline
"""

from collections.abc import Sequence
import os

from absl import app
from absl import flags

_STAGES = flags.DEFINE_integer("num_stages", 4, "Pipeline stages S.")
_MICROBATCHES = flags.DEFINE_list(
  "microbatches", ["4", "8", "16", "32"], "Microbatch counts M."
)
_MB_SIZE = flags.DEFINE_integer(
  "microbatch_size", 4, "Sequences per microbatch."
)
_SEQ = flags.DEFINE_integer("seq", 64, "Sequence length.")
_D_MODEL = flags.DEFINE_integer("d_model", 64, "Model width.")
_LAYERS = flags.DEFINE_integer(
  "num_layers", 8, "Layers (a multiple of 2 * num_stages)."
)
_REPEATS = flags.DEFINE_integer("repeats", 2, "Repeats R of circular.")
_TIMED = flags.DEFINE_integer("timed_steps", 3, "Timed steps (median).")
_TIME_UP_TO = flags.DEFINE_integer(
  "time_up_to", 16, "Time steps only for M <= this; larger M: memory only."
)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_num_cpu_devices", 8)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from lightning_jax import models  # pylint: disable=import-outside-toplevel
  from lightning_jax import parallel  # pylint: disable=import-outside-toplevel
  from lightning_jax import training  # pylint: disable=import-outside-toplevel
  from lightning_jax.parallel import pipeline  # pylint: disable=import-outside-toplevel
  from lightning_jax.parallel import schedules  # pylint: disable=import-outside-toplevel
  from tools import benchlib  # pylint: disable=import-outside-toplevel

  s = _STAGES.value
  mesh = parallel.make_mesh({"data": 8 // s, "pipe": s})
  cfg = models.get_preset(
    "moe-hybrid",
    vocab_size=256,
    d_model=_D_MODEL.value,
    num_layers=_LAYERS.value,
    pattern=("attention",),
    ffn_pattern=("moe",),
    num_heads=4,
    head_dim=_D_MODEL.value // 4,
    num_experts=4,
    top_k=2,
    moe_d_ff=2 * _D_MODEL.value,
    attention_impl="reference",
  )
  loss_cfg = training.LossConfig(lbl_coef=0.01, z_coef=1e-3)
  params = models.init(jax.random.key(0), cfg)
  print(
    f"S={s}, microbatch {_MB_SIZE.value} x {_SEQ.value} tokens, "
    f"d_model {_D_MODEL.value}, {_LAYERS.value} attention+MoE layers, "
    f"mesh {dict(mesh.shape)}",
    flush=True,
  )
  rows = []
  for schedule, repeats in (
    ("gpipe", 1),
    ("circular", _REPEATS.value),
    ("1f1b", 1),
  ):
    stacked = pipeline.to_pipeline_params(params, s, repeats)
    stacked = jax.device_put(
      stacked, parallel.param_shardings(stacked, mesh, stage_axis=1)
    )
    for m in map(int, _MICROBATCHES.value):
      batch_size = m * _MB_SIZE.value
      tokens = jax.random.randint(
        jax.random.key(m), (batch_size, _SEQ.value), 0, cfg.vocab_size
      )
      batch = jax.device_put(
        {
          "inputs": tokens,
          "targets": jnp.roll(tokens, -1, axis=1),
          "mask": jnp.ones(tokens.shape, jnp.float32),
        },
        parallel.batch_sharding(mesh),
      )
      grad_fn = pipeline.pipeline_grad_fn(
        cfg,
        loss_cfg,
        mesh,
        schedule=schedule,
        num_microbatches=m,
        repeats=repeats,
      )
      compiled = jax.jit(grad_fn).lower(stacked, batch, None).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes
      seconds = float("nan")
      if m <= _TIME_UP_TO.value:
        seconds = benchlib.time_fn(
          compiled, stacked, batch, None, repeats=_TIMED.value
        )
      bubble = schedules.theoretical_bubble_fraction(s, m, repeats)
      rows.append(
        {
          "schedule": schedule,
          "R": repeats,
          "M": m,
          "bubble (S-1)/(RM+S-1)": bubble,
          "table bubble": schedules.tick_table(
            schedule, s, m, repeats
          ).bubble_fraction,
          "step ms": seconds * 1e3,
          "ms / microbatch": seconds * 1e3 / m,
          "1/(1-bubble)": 1 / (1 - bubble),
          "temp MB": temp / 2**20,
        }
      )
      print(benchlib.markdown_table(rows[-1:]).splitlines()[-1], flush=True)
  print()
  print(benchlib.markdown_table(rows))


if __name__ == "__main__":
  app.run(main)
