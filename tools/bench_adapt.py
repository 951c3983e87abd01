r"""NF4 / QLoRA figures: bits per parameter, dequantisation error, memory.

1. Bits per parameter of NF4 with double quantisation, and the error of
   NF4 (with and without double quantisation) against blockwise int4
   absmax (`round(7 x / absmax)`, same block) on an N(0, 1) matrix.
2. Params bytes per parameter and the compiled train step's memory
   (`memory_analysis()`, nothing is run) of LoRA over a dense float32 base
   against QLoRA over an NF4 base, same model and adapters.
3. With `--workdir` (a `tools.train` run): the same errors on its trained
   matrices (those `qlora.quantize` stores as NF4), per matrix kind and
   overall, relative to the weights' RMS, with bfloat16 rounding beside.

Usage (from the repository root):
  python -m tools.bench_adapt
  python -m tools.bench_adapt --d_model=1024 --num_layers=8 --dtype=bfloat16
  python -m tools.bench_adapt --workdir=/tmp/mask_base
"""

import re

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lightning_jax import adapt
from lightning_jax import models
from lightning_jax import training
from lightning_jax.adapt import lora
from lightning_jax.adapt import qlora
from lightning_jax.training import metrics
from tools import benchlib

_ROWS = flags.DEFINE_integer("rows", 1024, "Rows of the error matrix.")
_COLS = flags.DEFINE_integer("cols", 4096, "Columns of the error matrix.")
_BLOCK = flags.DEFINE_integer("block_size", 64, "NF4 / int4 block.")
_D_MODEL = flags.DEFINE_integer("d_model", 512, "Model width.")
_LAYERS = flags.DEFINE_integer("num_layers", 4, "Model layers.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch of the train step.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Sequence length.")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank.")
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "A tools.train run whose trained matrices to quantise."
)
_DTYPE = flags.DEFINE_enum(
  "dtype", "float32", ["float32", "bfloat16"], "Compute dtype."
)


def _int4_absmax(x, block: int):
  blocks = x.reshape(-1, block)
  absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
  return (jnp.round(7 * blocks / absmax) * absmax / 7).reshape(x.shape)


def error_rows() -> list[dict]:
  """Bits per parameter and errors of each 4-bit scheme on N(0, 1)."""
  block = _BLOCK.value
  x = jax.random.normal(jax.random.key(0), (_ROWS.value, _COLS.value))
  packed, absmax = adapt.nf4_quantize(x, block)
  t = adapt.to_nf4(x, block)
  schemes = {
    "int4 absmax (15 levels)": (_int4_absmax(x, block), 4 + 32 / block),
    "NF4": (
      adapt.nf4_dequantize(packed, absmax, x.shape, block),
      4 + 32 / block,
    ),
    "NF4 + double quant": (adapt.from_nf4(t), adapt.bits_per_param(t)),
  }
  rows = []
  for name, (y, bits) in schemes.items():
    err = np.asarray(y - x)
    rows.append(
      {
        "scheme": name,
        "block": block,
        "bits/param": f"{float(bits):.4f}",
        "RMSE": float(np.sqrt(np.mean(err**2))),
        "mean |err|": float(np.mean(np.abs(err))),
        "max |err|": float(np.max(np.abs(err))),
      }
    )
  return rows


# Matrix kinds of the trained-weights table: (label, pattern).
_KINDS = (
  ("mixer q/k/v/o", adapt.ATTENTION),
  ("other mixer matrices", adapt.MIXER),
  ("MLP", adapt.MLP),
)


def trained_rows(workdir: str) -> list[dict]:
  """Relative RMS errors of bf16, int4 absmax, NF4 and NF4 + double quant
  on the trained matrices of `workdir`, per kind and overall."""
  block = _BLOCK.value
  params, _, step = training.load_model(workdir)
  flat = adapt.paths.named_leaves(params)
  names = adapt.paths.match(params, (adapt.MIXER, adapt.MLP), "matrices")

  @jax.jit
  def four_bit(w):
    packed, absmax = adapt.nf4_quantize(w, block)
    return {
      "int4 absmax": _int4_absmax(w, block),
      "NF4": adapt.nf4_dequantize(packed, absmax, w.shape, block),
      "NF4 + DQ": adapt.from_nf4(adapt.to_nf4(w, block)),
    }

  stats = {}
  for name in names:
    w = np.asarray(flat[name], np.float32)
    if w.size % block:
      continue
    # bf16 rounding on the host: under jit XLA may drop an f32 -> bf16 ->
    # f32 round trip (excess precision).
    approx = {"bf16": w.astype(jnp.bfloat16).astype(np.float32)}
    quantized = jax.device_get(four_bit(w))
    approx.update((k, quantized[k]) for k in ("int4 absmax", "NF4", "NF4 + DQ"))
    norm = float(np.sum(np.square(w, dtype=np.float64)))
    errs = {
      k: float(np.sum(np.square(v - w, dtype=np.float64)))
      for k, v in approx.items()
    }
    bits = adapt.bits_per_param(adapt.to_nf4(w, block)) * w.size
    kind = next(k for k, p in _KINDS if re.fullmatch(p, name))
    stats[name] = (kind, w.size, norm, errs, bits)

  def row(label, chosen):
    size = sum(s[1] for s in chosen)
    norm = sum(s[2] for s in chosen)
    out = {"matrices": label, "count": len(chosen), "params": f"{size:,}"}
    for key in chosen[0][3]:
      rel = np.sqrt(sum(s[3][key] for s in chosen) / norm)
      out[f"{key} rel. RMSE"] = f"{rel:.4f}"
    out["NF4 + DQ bits/param"] = f"{sum(s[4] for s in chosen) / size:.4f}"
    return out

  rows = [
    row(label, [s for s in stats.values() if s[0] == label])
    for label, _ in _KINDS
    if any(s[0] == label for s in stats.values())
  ]
  rows.append(row("all", list(stats.values())))
  print(f"{workdir} step {step}: {len(stats)} of {len(names)} matrices")
  return rows


def _bytes(tree) -> int:
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory_rows() -> list[dict]:
  """LoRA (dense fp32 base) vs QLoRA (NF4 base): params and step memory."""
  cfg = models.get_preset(
    "transformer",
    d_model=_D_MODEL.value,
    num_layers=_LAYERS.value,
    num_heads=_D_MODEL.value // 64,
    head_dim=64,
    d_ff=4 * _D_MODEL.value,
    dtype=_DTYPE.value,
  )
  lora_cfg = adapt.LoraConfig(rank=_RANK.value, alpha=2.0 * _RANK.value)
  dtype = models.compute_dtype(cfg)
  dense = jax.eval_shape(lambda k: models.init(k, cfg), jax.random.key(0))
  quantized = jax.eval_shape(
    lambda p: qlora.quantize(p, block_size=_BLOCK.value), dense
  )
  adapters = jax.eval_shape(
    lambda p: lora.init(jax.random.key(1), p, lora_cfg), dense
  )
  opt = lora.freeze_base(optax.adamw(1e-4))
  grad_fn = lora.lora_grad_fn(
    training.default_grad_fn(cfg, training.LossConfig()), lora_cfg, dtype=dtype
  )
  step = training.make_train_step(opt, lambda s: 1e-4, grad_fn)
  tokens = jax.ShapeDtypeStruct((_BATCH.value, _SEQ.value), jnp.int32)
  batch = {
    "inputs": tokens,
    "targets": tokens,
    "mask": jax.ShapeDtypeStruct(tokens.shape, jnp.float32),
  }
  num_params = models.num_params(cfg)
  rows = []
  for name, base in (
    ("LoRA, fp32 base", dense),
    ("QLoRA, NF4 base", quantized),
  ):
    params = {"base": base, "lora": adapters}
    state = jax.eval_shape(
      lambda p: training.init_train_state(p, opt, jax.random.key(2)), params
    )
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    mem = metrics.compiled_memory(compiled)
    rows.append(
      {
        "run": name,
        "params": f"{num_params:,}",
        "base bits/param": round(8 * _bytes(base) / num_params, 3),
        "adapter params": f"{sum(x.size for x in jax.tree.leaves(adapters)):,}",
        "opt state MB": round(_bytes(state.opt_state) / 2**20, 2),
        "arguments MB": round(mem["compiled/arguments_mb"], 1),
        "temp MB": round(mem["compiled/temp_mb"], 1),
        "peak MB": round(mem["compiled/peak_mb"], 1),
      }
    )
  return rows


def main(argv):
  del argv
  print(f"devices: {jax.devices()}")
  print(benchlib.markdown_table(error_rows()))
  print()
  print(benchlib.markdown_table(memory_rows()))
  if _WORKDIR.value:
    print()
    print(benchlib.markdown_table(trained_rows(_WORKDIR.value)))


if __name__ == "__main__":
  app.run(main)
