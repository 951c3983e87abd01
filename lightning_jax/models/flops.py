"""Parameter and FLOP counts of a model config, for scaling laws.

Per token, forward (multiply-add = 2 FLOPs), as Kaplan et al. (2020,
arXiv 2001.08361, Table 1) count a transformer:

    forward = 2 (weights applied to the token) + 2 d_model V (the head)
              + sum over layers of the mixer's sequence mixing
    training = 3 forward  (the backward pass costs twice the forward)

"Weights applied to the token" are every >= 2-D block parameter (short
convolutions included: a depthwise kernel [K, C] costs 2 K C per token),
with MoE expert weights scaled by top_k / num_experts and MH-MoE's router
and experts by its sub-tokens per token. Embedding lookups are free.

Sequence mixing per layer (H heads, key width Dk, value width Dv, sequence
length T), in `MIXING_FLOPS` (a formula per registered mixer kind):

* attention, moa: `4 H Dk ctx`, q k^T and the weighted sum of v over the
  mean causal context `ctx = mean_t min(t, w)` (w: the sliding window or
  the head's MoA window; T without one, so ctx = (T + 1) / 2).
* lightning, hgrn2, mamba2 (Dk = state_dim, Dv = head_dim): `5 H Dk Dv`:
  decay the state (1), add k v^T (2), read S^T q (2).
* cosformer2: `4 H (2 Dk) Dv`: no decay, keys and queries of width 2 Dk.
* deltanet: `6 H Dk Dv`: S^T k (2), the rank-1 update (2), S^T q (2);
  gated_deltanet: `7 H Dk Dv` (plus the decay).

These count the recurrent form, the work the model defines; the chunked
kernels do O(chunk_size) more per token in dense matmuls.
"""

from typing import Callable

import jax
import numpy as np

from lightning_jax import layers
from lightning_jax import ops
from lightning_jax.models import config as config_lib
from lightning_jax.models import model as model_lib


def _attention(cfg, seq_len: int) -> float:
  t = np.arange(1, seq_len + 1)
  if cfg.moa_alphas is not None:
    windows = ops.moa_windows(cfg.moa_alphas, cfg.moa_betas, seq_len)
  else:
    windows = np.full(cfg.num_heads, cfg.window or seq_len)
  ctx = np.minimum(t[None, :], windows[:, None]).mean(axis=1)  # [heads]
  return float(4 * cfg.head_dim * np.sum(ctx))


def _recurrence(per_entry: int) -> Callable:
  def flops(cfg, seq_len: int) -> float:
    del seq_len
    value_dim = getattr(cfg, "value_dim", None) or cfg.head_dim
    key_dim = getattr(cfg, "state_dim", cfg.head_dim)
    return float(per_entry * cfg.num_heads * key_dim * value_dim)

  return flops


def _cosformer2(cfg, seq_len: int) -> float:
  del seq_len
  return float(4 * cfg.num_heads * 2 * cfg.head_dim * cfg.head_dim)


# Forward sequence-mixing FLOPs per token of one layer: (layer cfg, T);
# tests/models/test_flops.py checks every registered kind has one.
MIXING_FLOPS: dict[str, Callable] = {
  "attention": _attention,
  "moa": _attention,
  "lightning": _recurrence(5),
  "hgrn2": _recurrence(5),
  "mamba2": _recurrence(5),
  "cosformer2": _cosformer2,
  "deltanet": _recurrence(6),
  "gated_deltanet": _recurrence(7),
}


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
  fraction = 1.0
  if "moe" in keys and isinstance(ffn, layers.MHMoEConfig):
    fraction *= ffn.num_heads
  moe = getattr(ffn, "moe", ffn)
  if "experts" in keys:
    fraction *= moe.top_k / moe.num_experts
  return fraction


def flops_per_token(cfg: config_lib.ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (3 x forward; the module docstring).

  Raises:
    ValueError: a mixer kind without a `MIXING_FLOPS` formula.

  Example:
    >>> from lightning_jax import models
    >>> flops_per_token(models.get_preset("transformer"), 128) > 0
    True
  """
  blocks = config_lib.block_configs(cfg)
  missing = sorted({b.kind for b in blocks} - set(MIXING_FLOPS))
  if missing:
    raise ValueError(
      f"No FLOP formula for mixer(s) {missing}; formulas: "
      f"{sorted(MIXING_FLOPS)} (models/flops.py)."
    )
  shapes = _shapes(cfg)
  forward = 2.0 * cfg.d_model * cfg.vocab_size
  for block, layer in zip(blocks, shapes["layers"], strict=True):
    forward += MIXING_FLOPS[block.kind](block.mixer, seq_len)
    for path, x in jax.tree_util.tree_flatten_with_path(layer)[0]:
      if len(x.shape) >= 2:
        forward += 2.0 * np.prod(x.shape) * _active_fraction(path, block.ffn)
  return 3.0 * forward
