"""MoA plans for a model: profile -> search under a density budget, apply a
plan to a model config, and measure its loss increase.

MoA (Fu et al., 2024, arXiv 2406.14909, Sec. 4-5). The plan (`ops.MoAPlan`:
per softmax-attention layer and head, the elastic rule (alpha, beta)) lives
in `ModelConfig.moa_plan`, so a checkpoint is self-contained;
`ops.MoAPlan.load` / `save` read and write the authors' JSON.
"""

import dataclasses
from typing import NamedTuple

import jax
import numpy as np

from lightning_jax import models
from lightning_jax import ops
from lightning_jax.layers import mixers
from lightning_jax.moa import profile
from lightning_jax.moa import search


def with_plan(cfg: models.ModelConfig, plan: ops.MoAPlan) -> models.ModelConfig:
  """`cfg` with its softmax-attention layers turned into "moa" layers of
  `plan` (one row per such layer)."""
  pattern = tuple("moa" if mixers.get(m).softmax else m for m in cfg.pattern)
  return dataclasses.replace(cfg, pattern=pattern, moa_plan=plan)


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


def search_plan(
  params,
  cfg: models.ModelConfig,
  calibration,
  candidates,
  *,
  budget: float,
  block: int,
  sink: int = 0,
  max_rules_per_layer: int | None = None,
  monotone: bool = True,
) -> PlanSearch:
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
    monotone: search on the costs' monotone envelope (`moa.search`), not
      the raw first-order sums.

  Returns:
    The plan with its predicted loss increase and density per head.
  """
  profile_fn = jax.jit(profile.profile_model, static_argnums=(2, 3))
  alphas, betas = np.asarray(candidates, np.float64).T
  costs, dens = [], []
  for seq, tokens in sorted(calibration.items()):
    influence = np.asarray(profile_fn(params, tokens, cfg, block))
    costs.append(
      search.candidate_costs(influence, candidates, seq, block, sink, monotone)
    )
    dens.append(ops.moa_density(ops.moa_windows(alphas, betas, seq), seq, sink))
  costs, dens = np.stack(costs), np.stack(dens)
  choice = search.search_plan(costs, dens, budget, max_rules_per_layer)
  predicted = np.take_along_axis(costs, choice[None, ..., None], -1)[..., 0]
  return PlanSearch(
    search.plan_from_choice(choice, candidates),
    predicted,
    dens[:, choice],
    tuple(sorted(calibration)),
  )


def plan_loss_increase(
  params, cfg: models.ModelConfig, plan: ops.MoAPlan, tokens_BxT, sink: int = 0
) -> float:
  """Measured loss of the model with `plan` minus the dense model's loss."""
  sparse_cfg = dataclasses.replace(with_plan(cfg, plan), sink=sink)
  forward = jax.jit(models.forward, static_argnums=2)
  losses = [
    profile.next_token_loss(forward(params, tokens_BxT, c)[0], tokens_BxT)
    for c in (cfg, sparse_cfg)
  ]
  return float(losses[1] - losses[0])
