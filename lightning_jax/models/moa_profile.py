"""MoA profile -> search on a model: attention influence of every softmax
attention layer, and the exact per-head rule search under a density budget.

MoA (Fu et al., 2024, arXiv 2406.14909, Sec. 4). The influence formula is in
`lightning_jax.layers.moa_profile`; the search in `lightning_jax.ops.moa_search`.
Recurrent mixers, MLPs and MoE layers run unchanged; each dense "attention"
layer exposes its weights A through a zero probe whose gradient is dL/dA.
"""

import dataclasses
import pathlib
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import layers
from lightning_jax import ops
from lightning_jax.models import model
from lightning_jax.models.config import block_configs
from lightning_jax.models.config import ModelConfig
from lightning_jax.ops import moa_search


def next_token_loss(logits_BxTxV, tokens_BxT):
  """Mean cross-entropy of predicting `tokens[:, t + 1]` from position t."""
  logp = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), -1)
  target = tokens_BxT[:, 1:, None]
  return -jnp.mean(jnp.take_along_axis(logp, target, axis=-1))


def _check_profilable(cfg: ModelConfig):
  if not cfg.attention_layers:
    raise ValueError(f"`cfg` has no softmax-attention layer to profile "
                     f"(mixers {cfg.mixers}).")
  for i in cfg.attention_layers:
    if cfg.mixers[i] != "attention" or cfg.window is not None:
      raise ValueError("Profile the dense model: every softmax-attention "
                       f"layer must be a dense 'attention' mixer (layer {i}: "
                       f"{cfg.mixers[i]!r}, window {cfg.window}).")


def loss_probed(params, tokens_BxT, cfg: ModelConfig, probes):
  """The LM loss with `probes[i]` `[B, H, T, T]` added to the weights of the
  i-th attention layer.

  Returns:
    `(loss, [A_i [B, H, T, T] per attention layer])`.
  """
  params = model.cast_params(params, model.compute_dtype(cfg))
  h = model.embed(params, tokens_BxT, cfg)
  probes, weights = iter(probes), []
  for layer_params, block in zip(params["layers"], block_configs(cfg),
                                 strict=True):
    if isinstance(block.mixer, layers.AttentionConfig):
      probe = next(probes)
      mixer = lambda x, b=block, p=layer_params, pr=probe: (
          layers.attention_layer_probed(p["mixer"], x, b.mixer, pr))
      h, _, a = model.block_with_mixer(layer_params, h, block, mixer)
      weights.append(a)
    else:
      h, _ = model.apply_block(layer_params, h, block)
  return next_token_loss(model.head(params, h, cfg), tokens_BxT), weights


def profile_model(params, tokens_BxT, cfg: ModelConfig, block: int):
  """Block influence `[attention layers, heads, n_blocks, n_blocks]` on one
  batch.

  Example:
    >>> e = profile_model(params, tokens, models.get_preset("transformer"), 16)
  """
  _check_profilable(cfg)
  batch, seq = tokens_BxT.shape
  zeros = [jnp.zeros((batch, block_configs(cfg)[i].mixer.num_heads, seq, seq))
           for i in cfg.attention_layers]
  grads, weights = jax.grad(loss_probed, argnums=3, has_aux=True)(
      params, tokens_BxT, cfg, zeros)
  return jnp.stack([layers.attention_influence(a, g, block)
                    for a, g in zip(weights, grads, strict=True)])


def with_plan(cfg: ModelConfig, plan_path: str) -> ModelConfig:
  """`cfg` with its dense attention layers turned into MoA layers of the plan
  at `plan_path`."""
  pattern = tuple("moa" if m == "attention" else m for m in cfg.pattern)
  return dataclasses.replace(cfg, pattern=pattern, moa_plan=plan_path)


class PlanSearch(NamedTuple):
  """Result of `search_plan`.

  Attributes:
    plan: the chosen rules, one row per attention layer.
    predicted_NxLxH: predicted loss increase of each head's rule per length.
    density_NxLxH: density of each head's rule per length.
    lengths: the profiled lengths N.
  """
  plan: ops.MoAPlan
  predicted_NxLxH: np.ndarray
  density_NxLxH: np.ndarray
  lengths: tuple[int, ...]


def search_plan(params, cfg: ModelConfig, calibration, candidates, *,
                budget: float, block: int, sink: int = 0,
                max_rules_per_layer: int | None = None) -> PlanSearch:
  """Profile -> search: a MoA plan for the dense model under `budget`.

  Args:
    params: model params.
    cfg: the dense model's config.
    calibration: `{length N: tokens [batch, N]}`.
    candidates: `[(alpha, beta), ...]` rules to choose from.
    budget: largest mean density over all heads at every length.
    block: profiling block size.
    sink: sink length of the plan's masks.
    max_rules_per_layer: optional limit on distinct rules per layer.

  Returns:
    The plan with its predicted loss increase and density per head.
  """
  profile = jax.jit(profile_model, static_argnums=(2, 3))
  alphas, betas = np.asarray(candidates, np.float64).T
  costs, dens = [], []
  for seq, tokens in sorted(calibration.items()):
    influence = np.asarray(profile(params, tokens, cfg, block))
    costs.append(moa_search.candidate_costs(influence, candidates, seq, block,
                                            sink))
    dens.append(ops.moa_density(ops.moa_windows(alphas, betas, seq), seq,
                                sink))
  costs, dens = np.stack(costs), np.stack(dens)
  choice = moa_search.search_plan(costs, dens, budget, max_rules_per_layer)
  predicted = np.take_along_axis(costs, choice[None, ..., None], -1)[..., 0]
  return PlanSearch(moa_search.plan_from_choice(choice, candidates), predicted,
                    dens[:, choice], tuple(sorted(calibration)))


def plan_loss_increase(params, cfg: ModelConfig, plan: ops.MoAPlan,
                       tokens_BxT, sink: int = 0) -> float:
  """Measured loss of the model with `plan` minus the dense model's loss."""
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "plan.json"
    plan.save(str(path))
    sparse_cfg = dataclasses.replace(with_plan(cfg, str(path)), sink=sink)
    forward = jax.jit(model.forward, static_argnums=2)
    losses = [next_token_loss(forward(params, tokens_BxT, c)[0], tokens_BxT)
              for c in (cfg, sparse_cfg)]
  return float(losses[1] - losses[0])
