r"""Model-level throughput against sequence length: training and prefill.

For every preset and sequence length T, with the tokens per step fixed
(batch = --tokens / T), the tokens/s of

* a training step: forward + backward + AdamW (`benchlib.train_step_fn`);
* prefill: `inference.prefill` of the whole prompt (the decoding state
  included),

beside the GFLOP/s of a 1024^3 fp32 matmul timed right after each preset,
and each preset's tokens/s over the `transformer` preset's at the same T
(the ratio is what a linear-time model must win at long context). With
--plot, tokens/s against T per preset (Lightning Attention-2's "flat in T"
figure; matplotlib needed).

Usage (from the repository root):
  python -m tools.bench_models --seq_lens=512,2048,8192 \
      --presets=transformer,tnl,deltanet --plot=/tmp/models.png
"""

import functools
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

from lightning_jax import layers
from lightning_jax import models
from lightning_jax.inference import decode
from tools import benchlib

_PRESETS = flags.DEFINE_list(
  "presets",
  [
    "transformer",
    "tnl",
    "deltanet",
    "gated-deltanet",
    "hgrn2",
    "mamba2",
    "cosformer2",
    "tiny-hybrid",
  ],
  "Presets to time (transformer first: the others are relative to it).",
)
_SEQ_LENS = flags.DEFINE_list(
  "seq_lens", ["512", "1024", "2048", "4096", "8192", "16384"], "Lengths T."
)
_TOKENS = flags.DEFINE_integer(
  "tokens", 16384, "Tokens per step: batch = tokens / T (at least 1)."
)
_PARTS = flags.DEFINE_list("parts", ["train", "prefill"], "train, prefill.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (median).")
_PLOT = flags.DEFINE_string("plot", None, "Write tokens/s vs T here (PNG).")
_RECURRENT_IMPL = flags.DEFINE_enum(
  "recurrent_impl",
  None,
  list(layers.RECURRENT_IMPLS),
  "Kernel form of the linear-recurrence mixers (default: the preset's).",
)
_CLOCK = flags.DEFINE_enum(
  "clock",
  "wall",
  list(benchlib.CLOCKS),
  "wall, or cpu: process CPU seconds (on a loaded machine; ratios only).",
)


def _train_seconds(cfg, params, tokens_BxT) -> float:
  optimizer = optax.adamw(1e-3)
  step = benchlib.train_step_fn(cfg, optimizer)
  return benchlib.time_fn(
    functools.partial(step, params, optimizer.init(params)),
    tokens_BxT,
    repeats=_REPEATS.value,
    clock=_CLOCK.value,
  )


def _prefill_seconds(cfg, params, tokens_BxT) -> float:
  batch, seq = tokens_BxT.shape[0], tokens_BxT.shape[1] - 1
  lengths = jnp.full((batch,), seq, jnp.int32)
  fn = jax.jit(lambda p, t: decode.prefill(p, t, lengths, cfg, seq)[0])
  return benchlib.time_fn(
    fn,
    params,
    tokens_BxT[:, :-1],
    repeats=_REPEATS.value,
    clock=_CLOCK.value,
  )


_TIMERS = {"train": _train_seconds, "prefill": _prefill_seconds}


def measure() -> list[dict]:
  """One row per (preset, T): tokens/s of each part and the matmul rate."""
  rows = []
  for name in _PRESETS.value:
    overrides = {}
    if _RECURRENT_IMPL.value:
      overrides["recurrent_impl"] = _RECURRENT_IMPL.value
    cfg = models.get_preset(name, **overrides)
    params = models.init(jax.random.key(0), cfg)
    preset_rows = []
    for seq in (int(t) for t in _SEQ_LENS.value):
      batch = max(1, _TOKENS.value // seq)
      tokens = jax.random.randint(
        jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size
      )
      row = {"preset": name, "seq": seq, "batch": batch}
      for part in _PARTS.value:
        row[f"{part}_tok_s"] = batch * seq / _TIMERS[part](cfg, params, tokens)
      preset_rows.append(row)
    matmul = benchlib.matmul_gflops(
      clock=_CLOCK.value
    )  # beside each preset: the load drifts
    rows += [dict(r, matmul_gflops=matmul) for r in preset_rows]
  return rows


def with_ratios(rows: list[dict]) -> list[dict]:
  """Adds each part's tokens/s over transformer's at the same T."""
  base = {r["seq"]: r for r in rows if r["preset"] == "transformer"}
  for row in rows:
    for part in _PARTS.value:
      ref = base.get(row["seq"])
      key = f"{part}_tok_s"
      row[f"{part}_vs_transformer"] = row[key] / ref[key] if ref else None
  return rows


def plot(rows: list[dict], path: str) -> None:
  """tokens/s against T, one line per preset and part."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    sys.exit("error: --plot needs matplotlib: pip install -e '.[plot]'")
  fig, axes = plt.subplots(
    1, len(_PARTS.value), figsize=(6 * len(_PARTS.value), 4)
  )
  for ax, part in zip(
    axes if len(_PARTS.value) > 1 else [axes], _PARTS.value, strict=True
  ):
    for name in _PRESETS.value:
      mine = [r for r in rows if r["preset"] == name]
      ax.plot(
        [r["seq"] for r in mine],
        [r[f"{part}_tok_s"] for r in mine],
        marker="o",
        label=name,
      )
    ax.set(xscale="log", yscale="log", xlabel="T", ylabel="tokens/s")
    ax.set_title(f"{part}, {_TOKENS.value} tokens per step")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  rows = with_ratios(measure())
  print(f"# {' '.join(sys.argv)}")
  print(
    benchlib.markdown_table(
      [{k: ("-" if v is None else v) for k, v in r.items()} for r in rows]
    )
  )
  if _PLOT.value:
    plot(rows, _PLOT.value)


if __name__ == "__main__":
  app.run(main)
