"""RMS normalisation: learnable RMSNorm and TNL's parameter-free SRMSNorm."""

import jax.numpy as jnp

from lightning_jax import ops


def init_rms_norm(dim: int) -> dict:
  """RMSNorm params `{"scale": [dim]}`, ones.

  Example:
    >>> init_rms_norm(4)["scale"].shape
    (4,)
  """
  return {"scale": jnp.ones((dim,), jnp.float32)}


def simple_rms_norm(x, eps: float = 1e-6):
  """SRMSNorm, `x / rms(x)` over the last axis without a scale.

  TransNormerLLM (Qin et al., 2023, arXiv 2307.14995, Sec. 3.4). Computed in
  float32, returned in `x.dtype`.
  """
  xf = ops.drop_unit_axes(x).astype(jnp.float32)
  inv = jnp.reciprocal(jnp.sqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps))
  return (xf * inv).astype(x.dtype).reshape(x.shape)


def rms_norm(params: dict, x, eps: float = 1e-6):
  """RMSNorm (Zhang & Sennrich, 2019): `scale * x / rms(x)` on the last axis.

  Args:
    params: `{"scale": [dim]}` from `init_rms_norm`.
    x: `[..., dim]`.
    eps: added to the mean square.

  Returns:
    `[..., dim]` in `x.dtype` (float32 arithmetic).

  Example:
    >>> rms_norm(init_rms_norm(4), jnp.ones((2, 4))).shape
    (2, 4)
  """
  rows = ops.drop_unit_axes(x).astype(jnp.float32)
  scale = params["scale"].astype(jnp.float32)
  scale = scale.reshape((1,) * (rows.ndim - 1) + scale.shape)
  return (simple_rms_norm(rows, eps) * scale).astype(x.dtype).reshape(x.shape)
