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

`search_attention_lm_plan` chains profiling at several lengths with the
exact search of `lightning_jax.ops.moa_search`.

Until the `models` room exists, a tiny attention-only LM (embedding, residual
attention layers with RMS normalisation, untied head) stands in as the model.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import _checks
from lightning_jax.layers import attention as attention_layers
from lightning_jax.ops import moa as moa_lib
from lightning_jax.ops import moa_search


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
      row - g)
  batch, heads, seq, _ = dl.shape
  n = -(-seq // block)
  pad = n * block - seq
  dl = jnp.pad(dl, ((0, 0), (0, 0), (0, pad), (0, pad)))
  return dl.reshape(batch, heads, n, block, n, block).sum((0, 3, 5))


@dataclasses.dataclass(frozen=True)
class AttentionLMConfig:
  """A tiny attention-only LM for profiling (stand-in for `models`)."""
  vocab_size: int
  num_layers: int
  attention: attention_layers.AttentionConfig

  def __post_init__(self):
    _checks.check_positive_int("vocab_size", self.vocab_size)
    _checks.check_positive_int("num_layers", self.num_layers)


def init_attention_lm(key, cfg: AttentionLMConfig) -> dict:
  """`{"embed": [V, D], "layers": [attention params...], "head": [D, V]}`.

  Example:
    >>> cfg = AttentionLMConfig(256, 2, AttentionConfig(32, 4, 2, 8))
    >>> params = init_attention_lm(jax.random.key(0), cfg)
  """
  d = cfg.attention.d_model
  keys = jax.random.split(key, cfg.num_layers + 2)
  return {
      "embed": jax.random.normal(keys[0], (cfg.vocab_size, d)),
      "layers": [attention_layers.init_attention(k, cfg.attention)
                 for k in keys[2:]],
      "head": jax.random.normal(keys[1], (d, cfg.vocab_size)) * d ** -0.5,
  }


def _rms_norm(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _loss(params, h, tokens_BxT):
  logits = _rms_norm(h[:, :-1]) @ params["head"]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target = tokens_BxT[:, 1:, None]
  return -jnp.mean(jnp.take_along_axis(logp, target, axis=-1))


def attention_lm_loss(params, tokens_BxT, cfg: AttentionLMConfig,
                      plan=None):
  """Mean next-token cross-entropy; `plan` (an `MoAPlan`) sparsifies layers."""
  h = params["embed"][tokens_BxT]
  for i, layer in enumerate(params["layers"]):
    layer_cfg = (cfg.attention if plan is None
                 else attention_layers.with_moa_plan(cfg.attention, plan, i))
    h = h + attention_layers.attention_layer(layer, _rms_norm(h), layer_cfg)
  return _loss(params, h, tokens_BxT)


def attention_lm_loss_probed(params, tokens_BxT, cfg: AttentionLMConfig,
                             probes):
  """The loss with `probes[l]` `[B, H, T, T]` added to layer l's weights.

  Returns:
    `(loss, [A_l [B, H, T, T] per layer])`.
  """
  h = params["embed"][tokens_BxT]
  weights = []
  for layer, probe in zip(params["layers"], probes, strict=True):
    y, a = attention_layers.attention_layer_probed(
        layer, _rms_norm(h), cfg.attention, probe)
    h = h + y
    weights.append(a)
  return _loss(params, h, tokens_BxT), weights


def profile_attention_lm(params, tokens_BxT, cfg: AttentionLMConfig,
                         block: int):
  """Block influence `[layers, heads, n_blocks, n_blocks]` on one batch.

  Example:
    >>> e = profile_attention_lm(params, tokens, cfg, block=16)
  """
  batch, seq = tokens_BxT.shape
  zeros = [jnp.zeros((batch, cfg.attention.num_heads, seq, seq))
           for _ in range(cfg.num_layers)]
  grad_fn = jax.grad(attention_lm_loss_probed, argnums=3, has_aux=True)
  grads, weights = grad_fn(params, tokens_BxT, cfg, zeros)
  return jnp.stack([attention_influence(a, g, block)
                    for a, g in zip(weights, grads, strict=True)])


class PlanSearch(NamedTuple):
  """Result of `search_attention_lm_plan`.

  Attributes:
    plan: the chosen per-layer, per-head rules.
    predicted_NxLxH: predicted loss increase of each head's rule per length.
    density_NxLxH: density of each head's rule per length.
    lengths: the profiled lengths N.
  """
  plan: moa_lib.MoAPlan
  predicted_NxLxH: np.ndarray
  density_NxLxH: np.ndarray
  lengths: tuple[int, ...]


def search_attention_lm_plan(params, cfg: AttentionLMConfig, calibration,
                             candidates, *, budget: float, block: int,
                             sink: int = 0,
                             max_rules_per_layer: int | None = None
                             ) -> PlanSearch:
  """Profile -> search: a MoA plan for the (dense) LM under `budget`.

  Args:
    params: LM parameters.
    cfg: LM config (profiled as given; normally dense attention).
    calibration: `{length N: tokens [batch, N]}`.
    candidates: `[(alpha, beta), ...]` rules to choose from.
    budget: largest mean density over all heads at every length.
    block: profiling block size.
    sink: sink length of the plan's masks.
    max_rules_per_layer: optional limit on distinct rules per layer.

  Returns:
    The plan with its predicted loss increase and density per head.

  Example:
    >>> found = search_attention_lm_plan(params, cfg, {64: tokens},
    ...                                  [(8, 0), (0, 1)], budget=0.5, block=16)
  """
  profile = jax.jit(profile_attention_lm, static_argnums=(2, 3))
  alphas, betas = np.asarray(candidates, np.float64).T
  costs, dens = [], []
  for seq, tokens in sorted(calibration.items()):
    influence = np.asarray(profile(params, tokens, cfg, block))
    costs.append(moa_search.candidate_costs(influence, candidates, seq, block,
                                            sink))
    dens.append(moa_lib.moa_density(moa_lib.moa_windows(alphas, betas, seq),
                                    seq, sink))
  costs, dens = np.stack(costs), np.stack(dens)
  choice = moa_search.search_plan(costs, dens, budget, max_rules_per_layer)
  predicted = np.take_along_axis(costs, choice[None, ..., None], -1)[..., 0]
  return PlanSearch(moa_search.plan_from_choice(choice, candidates), predicted,
                    dens[:, choice], tuple(sorted(calibration)))
