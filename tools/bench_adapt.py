r"""NF4 / QLoRA figures: bits per parameter, dequantisation error, memory.

1. Bits per parameter of NF4 with double quantisation, and the error of
   NF4 (with and without double quantisation) against blockwise int4
   absmax (`round(7 x / absmax)`, same block) on an N(0, 1) matrix.
2. Params bytes per parameter and the compiled train step's memory
   (`memory_analysis()`, nothing is run) of LoRA over a dense float32 base
   against QLoRA over an NF4 base, same model and adapters.

Usage (from the repository root):
  python -m tools.bench_adapt
  python -m tools.bench_adapt --d_model=1024 --num_layers=8 --dtype=bfloat16
"""

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
from tools import benchlib

_ROWS = flags.DEFINE_integer("rows", 1024, "Rows of the error matrix.")
_COLS = flags.DEFINE_integer("cols", 4096, "Columns of the error matrix.")
_BLOCK = flags.DEFINE_integer("block_size", 64, "NF4 / int4 block.")
_D_MODEL = flags.DEFINE_integer("d_model", 512, "Model width.")
_LAYERS = flags.DEFINE_integer("num_layers", 4, "Model layers.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch of the train step.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Sequence length.")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank.")
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
    mem = compiled.memory_analysis()
    peak = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    )
    rows.append(
      {
        "run": name,
        "params": f"{num_params:,}",
        "base bits/param": round(8 * _bytes(base) / num_params, 3),
        "adapter params": f"{sum(x.size for x in jax.tree.leaves(adapters)):,}",
        "opt state MB": round(_bytes(state.opt_state) / 2**20, 2),
        "arguments MB": round(mem.argument_size_in_bytes / 2**20, 1),
        "temp MB": round(mem.temp_size_in_bytes / 2**20, 1),
        "peak MB": round(peak / 2**20, 1),
      }
    )
  return rows


def main(argv):
  del argv
  print(f"devices: {jax.devices()}")
  print(benchlib.markdown_table(error_rows()))
  print()
  print(benchlib.markdown_table(memory_rows()))


if __name__ == "__main__":
  app.run(main)
