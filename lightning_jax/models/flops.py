"""Parameter and FLOP counts of a model config: scaling laws and MFU.

Per token, forward (multiply-add = 2 FLOPs), as Kaplan et al. (2020,
arXiv 2001.08361, Table 1) count a transformer:

    forward = 2 (weights applied to the token) + 2 d_model V (the head)
              + sum over layers of the mixer's sequence mixing
    training = 3 forward  (the backward pass costs twice the forward)

"Weights applied to the token" are every >= 2-D block parameter (short
convolutions included: a depthwise kernel [K, C] costs 2 K C per token),
with MoE FFN expert weights scaled by top_k / num_experts and MH-MoE's
router and experts by its sub-tokens per token (attention experts and a
MoE's shared expert, `moe_shared_d_ff`, run for every token: unscaled).
Embedding lookups are free.

The sequence mixing per layer is each registered mixer's own `flops`
(`layers.mixers.Mixer`): the work the model defines, e.g. for attention
`4 H Dh ctx` over the mean causal context and for a linear recurrence
`c H Dk Dv` with c = 5 (decayed linear attention, HGRN2, Mamba-2), 6
(DeltaNet), 7 (gated DeltaNet). The chunked kernels do O(chunk_size) more
per token in dense matmuls: that is kernel overhead, not model FLOPs, so it
lowers MFU as it should.

Why not XLA's `compiled.cost_analysis()`: it counts a loop body once,
whatever its trip count (a `lax.scan` of ten 256 x 256 matmuls reports
3.4e7 FLOPs instead of 3.4e8), and every chunked recurrence, MoA band loop
and scanned layer stack is such a loop.
"""

import jax
import numpy as np

from lightning_jax import layers
from lightning_jax.layers import mixers
from lightning_jax.models import config as config_lib
from lightning_jax.models import model as model_lib


def non_embedding_params(cfg: config_lib.ModelConfig) -> int:
  """Parameters outside the embedding (and an untied head), from shapes."""
  shapes = _shapes(cfg)
  return int(
    sum(
      np.prod(x.shape)
      for k, tree in shapes.items()
      if k not in ("embed", "unembed")
      for x in jax.tree.leaves(tree)
    )
  )


def _shapes(cfg) -> dict:
  return jax.eval_shape(lambda: model_lib.init(jax.random.key(0), cfg))


def _active_fraction(path, ffn) -> float:
  keys = [getattr(k, "key", None) for k in path]
  if "ffn" not in keys:  # mixer params (attention experts all run)
    return 1.0
  fraction = 1.0
  if "moe" in keys and isinstance(ffn, layers.MHMoEConfig):
    fraction *= ffn.num_heads
  moe = getattr(ffn, "moe", ffn)
  if "experts" in keys:
    fraction *= moe.top_k / moe.num_experts
  return fraction


def active_params(cfg: config_lib.ModelConfig) -> int:
  """Parameters applied to one token, as `flops_per_token` counts them:
  every parameter, MoE FFN experts scaled by `top_k / num_experts` (MH-MoE's
  also by its sub-tokens per token); attention experts all run, also with
  top-k routing.

  Example:
    >>> from lightning_jax import models
    >>> cfg = models.get_preset("moe-hybrid")
    >>> active_params(cfg) < models.num_params(cfg)
    True
  """
  blocks = config_lib.block_configs(cfg)
  shapes = _shapes(cfg)
  active = sum(
    np.prod(x.shape)
    for name, tree in shapes.items()
    if name != "layers"
    for x in jax.tree.leaves(tree)
  )
  for block, layer in zip(blocks, shapes["layers"], strict=True):
    for path, x in jax.tree_util.tree_flatten_with_path(layer)[0]:
      active += np.prod(x.shape) * _active_fraction(path, block.ffn)
  return int(round(active))


def flops_per_token(cfg: config_lib.ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (3 x forward; the module docstring).

  Args:
    cfg: the `models.ModelConfig`.
    seq_len: tokens per sequence (attention costs more per token at longer
      sequences).

  Example:
    >>> from lightning_jax import models
    >>> flops_per_token(models.get_preset("transformer"), 128) > 0
    True
  """
  blocks = config_lib.block_configs(cfg)
  shapes = _shapes(cfg)
  forward = 2.0 * cfg.d_model * cfg.vocab_size
  for block, layer in zip(blocks, shapes["layers"], strict=True):
    forward += mixers.get(block.kind).flops(block.mixer, seq_len)
    for path, x in jax.tree_util.tree_flatten_with_path(layer)[0]:
      if len(x.shape) >= 2:
        forward += 2.0 * np.prod(x.shape) * _active_fraction(path, block.ffn)
  return 3.0 * forward
