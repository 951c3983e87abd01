"""Model FLOPs counted from the program: matmuls of the traced forward.

XLA's `cost_analysis()` counts a loop body once, whatever its trip count, so
it undercounts every scan (chunked recurrences, layer loops, MoA band loops).
`matmul_flops` instead walks the jaxpr: each `dot_general` costs
`2 * batch * M * K * N`, a `scan` body counts `length` times, a `cond` its
dearest branch, and any other sub-program (`jit`, `remat`, custom
derivatives, `shard_map` per shard) once. Elementwise work is not counted:
the figure is the matmul FLOPs that MFU is conventionally measured in
(PaLM, Chowdhery et al. 2022, App. B), for every mixer without a per-mixer
formula.

`flops_per_token` is the model FLOPs of one trained token: 3x the forward
(the backward computes two matmuls per forward matmul), without any
rematerialisation, so MFU = flops_per_token * tokens/s / peak FLOP/s.
"""

import math

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

from lightning_jax.models import model as model_lib


def _dot_flops(eqn) -> int:
  """`2 * batch * M * K * N` of one `dot_general`."""
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
  rhs_free = math.prod(
    d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)
  )
  return 2 * math.prod(lhs) * rhs_free


def _sub_jaxprs(eqn):
  """The jaxprs held in an equation's params (sub-programs)."""
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax_core.Jaxpr):
        yield item


def _jaxpr_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * _jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    elif name == "cond":
      total += max(_jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      total += sum(_jaxpr_flops(sub) for sub in _sub_jaxprs(eqn))
  return total


def matmul_flops(fn, *args, **kwargs) -> int:
  """Matmul FLOPs of `fn(*args, **kwargs)`, counted on its jaxpr.

  Args:
    fn: a JAX-traceable function.
    *args, **kwargs: its arguments: arrays or `jax.ShapeDtypeStruct`s.

  Returns:
    The FLOPs of its `dot_general`s, scan bodies times their length.

  Example:
    >>> matmul_flops(jnp.matmul, jnp.ones((4, 8)), jnp.ones((8, 2)))
    128
  """
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def flops_per_token(cfg, seq_len: int) -> float:
  """Model FLOPs of training on one token at `seq_len` (forward + backward).

  Args:
    cfg: the `models.ModelConfig`.
    seq_len: tokens per sequence (attention-like mixers cost more per token
      at longer sequences).

  Returns:
    `3 * matmul_flops(forward) / seq_len` for one sequence, the LM head
    included, embeddings (a gather) not.
  """
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"`seq_len` must be a positive int, got {seq_len!r}.")
  params = jax.eval_shape(lambda k: model_lib.init(k, cfg), jax.random.key(0))
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  forward = matmul_flops(
    lambda p, t: model_lib.forward(p, t, cfg)[0], params, tokens
  )
  return float(3 * np.float64(forward) / seq_len)
