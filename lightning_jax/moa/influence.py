"""MoA profiling: attention influence per layer, head and block.

MoA (Fu et al., 2024, arXiv 2406.14909, Sec. 4.1). Masking A_ij and
renormalising its row changes the row to A'_in = A_in / (1 - A_ij) (n != j),
A'_ij = 0. To first order in A' - A, with g = dL/dA,

    dL_ij = sum_n g_in (A'_in - A_in) = A_ij / (1 - A_ij) * (G_i - g_ij),
    G_i = sum_n A_in g_in

(0 where A_ij = 1: a lone key cannot be removed). The influence of a block
is the sum over its pairs and over the calibration batch. MoA's paper writes
the same expansion with the factor 1 / (1 - A_ij) dropped (equal for small
A_ij); here it is kept, so dL_ij is exactly the derivative along the removal.

`moa.profile` probes a model's attention layers with it; `moa.plan` chains
profiling at several lengths with the exact search of `moa.search`.
"""

import jax.numpy as jnp


def attention_influence(a_BxHxTxT, g_BxHxTxT, block: int):
  """Block influence `[heads, n_blocks, n_blocks]` of one layer.

  Args:
    a_BxHxTxT: attention probabilities A of a layer.
    g_BxHxTxT: dL/dA.
    block: block size (the last block may be partial).

  Returns:
    Sum over the batch and each block of the first-order loss change when
    A_ij is removed and its row renormalised.

  Example:
    >>> e = attention_influence(a, g, block=16)
  """
  a = a_BxHxTxT.astype(jnp.float32)
  g = g_BxHxTxT.astype(jnp.float32)
  row = jnp.sum(a * g, axis=-1, keepdims=True)
  removable = a < 1.0
  dl = jnp.where(removable, a / jnp.where(removable, 1.0 - a, 1.0), 0.0) * (
    row - g
  )
  batch, heads, seq, _ = dl.shape
  n = -(-seq // block)
  pad = n * block - seq
  dl = jnp.pad(dl, ((0, 0), (0, 0), (0, pad), (0, pad)))
  return dl.reshape(batch, heads, n, block, n, block).sum((0, 3, 5))
