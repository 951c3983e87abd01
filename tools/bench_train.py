r"""Training-step benchmark: tokens/s of one forward + backward + AdamW step
per model preset, and its MFU against a same-run fp32 matmul's FLOP/s.

MFU = `models.flops_per_token` (model FLOPs per trained token: per-mixer
formulas, x3 for the backward) x tokens/s / the matmul rate measured right
after the preset's timing: the fraction of what this machine's matmul
reaches that the model reaches inside a training step. Besides
`models.flops_per_token` it uses only `models.get_preset / init / forward`
and optax.

Usage (from the repository root):
  python -m tools.bench_train --presets=tiny-hybrid,tnl --batch=8 --seq=256
"""

import functools
import sys

from absl import app
from absl import flags
import jax
import optax

from lightning_jax import models
from tools import benchlib

_PRESETS = flags.DEFINE_list(
  "presets",
  [
    "tiny-hybrid",
    "tnl",
    "deltanet",
    "gated-deltanet",
    "hgrn2",
    "transformer",
    "moe-hybrid",
  ],
  "Presets to time.",
)
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps (median).")
_LABEL = flags.DEFINE_string("label", "", "A label column (e.g. a commit).")


def main(argv):
  del argv
  rows = []
  for name in _PRESETS.value:
    cfg = models.get_preset(name)
    params = models.init(jax.random.key(0), cfg)
    optimizer = optax.adamw(1e-3)
    tokens = jax.random.randint(
      jax.random.key(1), (_BATCH.value, _SEQ.value + 1), 0, cfg.vocab_size
    )
    step = benchlib.train_step_fn(cfg, optimizer)
    seconds = benchlib.time_fn(
      functools.partial(step, params, optimizer.init(params)),
      tokens,
      repeats=_REPEATS.value,
    )
    matmul = benchlib.matmul_gflops()  # beside each preset: the load drifts
    tokens_per_s = _BATCH.value * _SEQ.value / seconds
    flops = models.flops_per_token(cfg, _SEQ.value)
    rows.append(
      dict(
        label=_LABEL.value,
        preset=name,
        step_ms=seconds * 1e3,
        tokens_per_s=tokens_per_s,
        gflop_per_token=flops / 1e9,
        matmul_gflops=matmul,
        mfu=flops * tokens_per_s / (matmul * 1e9),
      )
    )
  print(f"# {' '.join(sys.argv)}")
  print(benchlib.markdown_table(rows))


if __name__ == "__main__":
  app.run(main)
