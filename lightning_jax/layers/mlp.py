"""GLU feed-forward layer (SwiGLU by default)."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lightning_jax import _checks
from lightning_jax import moe


def dense_init(key, shape, dtype):
  """Truncated-normal init, std `fan_in ** -0.5`, of `[..., fan_in, fan_out]`.

  Leading axes (e.g. experts) are batch axes: they do not count in fan-in.
  """
  return jax.nn.initializers.variance_scaling(
    1.0,
    "fan_in",
    "truncated_normal",
    in_axis=-2,
    out_axis=-1,
    batch_axis=tuple(range(len(shape) - 2)),
  )(key, shape, dtype)


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """GLU MLP config.

  Attributes:
    d_model: model width.
    d_ff: hidden width.
    activation: "silu" (SwiGLU), "gelu" (GeGLU) or "relu" (ReGLU).
    dtype: parameter dtype.
  """

  d_model: int
  d_ff: int
  activation: str = "silu"
  dtype: Any = jnp.float32

  def __post_init__(self):
    _checks.check_positive_int("d_model", self.d_model)
    _checks.check_positive_int("d_ff", self.d_ff)
    _checks.check_choice("activation", self.activation, tuple(moe.ACTIVATIONS))


def init_mlp(key, cfg: MLPConfig) -> dict:
  """GLU MLP params `{"w_gate": [D, F], "w_up": [D, F], "w_down": [F, D]}`.

  Example:
    >>> p = init_mlp(jax.random.key(0), MLPConfig(d_model=8, d_ff=16))
    >>> p["w_down"].shape
    (16, 8)
  """
  k_gate, k_up, k_down = jax.random.split(key, 3)
  d, f = cfg.d_model, cfg.d_ff
  return {
    "w_gate": dense_init(k_gate, (d, f), cfg.dtype),
    "w_up": dense_init(k_up, (d, f), cfg.dtype),
    "w_down": dense_init(k_down, (f, d), cfg.dtype),
  }


def mlp(params: dict, x_BxTxD, cfg: MLPConfig):
  """`(act(x W_gate) * x W_up) W_down` on `[batch, seq, d_model]`.

  Args:
    params: from `init_mlp`.
    x_BxTxD: `[batch, seq, d_model]`.
    cfg: the `MLPConfig` of `params`.

  Returns:
    `[batch, seq, d_model]` in `x_BxTxD.dtype` (float32 accumulation).

  Raises:
    ValueError: `x_BxTxD` is not `[batch, seq, d_model]`.

  Example:
    >>> cfg = MLPConfig(d_model=8, d_ff=16)
    >>> mlp(init_mlp(jax.random.key(0), cfg), jnp.ones((2, 3, 8)), cfg).shape
    (2, 3, 8)
  """
  _checks.check_rank("x_BxTxD", x_BxTxD, 3, "[batch, seq, d_model]")
  _checks.check_shape(
    "x_BxTxD",
    x_BxTxD,
    x_BxTxD.shape[:2] + (cfg.d_model,),
    "[batch, seq, d_model]",
  )
  x_NxD = x_BxTxD.reshape(-1, cfg.d_model)
  y_NxD = moe.glu(x_NxD, moe.GLUWeights(**params), activation=cfg.activation)
  return y_NxD.reshape(x_BxTxD.shape)
