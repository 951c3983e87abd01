"""MoA plan search: choose one elastic rule per head under a density budget.

MoA (Fu et al., 2024, arXiv 2406.14909, Sec. 4): given the profiled
influence E[l, h, I, J] of each attention block (the first-order loss change
if the block were masked, see `lightning_jax.layers.moa_profile`), the loss
increase predicted for head (l, h) under candidate rule c at length N is

    cost[N, l, h, c] = sum_{I, J} E_N[l, h, I, J] * dropped_c,N[I, J],

with dropped[I, J] the fraction of block (I, J)'s causal pairs that the
candidate's mask removes. The search solves the exact 0/1 program

    min   sum_{N, l, h, c} cost[N, l, h, c] x[l, h, c]
    s.t.  sum_c x[l, h, c] = 1                          (one rule per head)
          sum_{l, h, c} density[N, c] x[l, h, c] <= budget * L * H   (each N)
          x[l, h, c] <= y[l, c],  sum_c y[l, c] <= K   (optional: <= K
                                                        distinct rules/layer)

with `scipy.optimize.milp` (HiGHS branch and bound; exact up to its gap).
Among plans of the least cost it returns the densest (a second MILP): equal
predictions never leave budget unused.

The first-order influence sums to zero over each query row (sum_j A_ij (G_i
- g_ij) = 0), so it can predict that dropping attention *lowers* the loss,
and a search on raw costs buys those predicted gains with the sparsest
rules, far outside the region where a linear estimate holds (docs/moa.md,
*Search*). By default `candidate_costs` therefore returns each head's
monotone envelope: since the rules' dropped sets are nested (a narrower
window drops a superset of pairs), a rule costs at least every wider rule
and at least 0, the cost of dropping nothing. `monotone=False` gives the
paper's raw sums. Pure numpy/scipy: no parameters, no JAX.
"""

from collections.abc import Sequence

import numpy as np
from scipy import optimize
from scipy import sparse

from lightning_jax import _checks
from lightning_jax import ops


def dropped_block_fraction(
  window: int, seq_len: int, block: int, sink: int = 0
) -> np.ndarray:
  """Fraction of each block's causal pairs that the MoA mask drops.

  Args:
    window: the head's window at this length.
    seq_len: sequence length N.
    block: profiling block size (the last block may be partial).
    sink: sink length.

  Returns:
    `[n_blocks, n_blocks]` in [0, 1]; 0 for blocks with no causal pair.

  Example:
    >>> dropped_block_fraction(1, 4, 2)  # keeps the diagonal only
    array([[0.33333333, 0.        ],
           [1.        , 0.33333333]])
  """
  n = -(-seq_len // block)
  t = np.arange(seq_len)[:, None]
  s = np.arange(seq_len)[None, :]
  causal = s <= t
  dropped = causal & (t - s >= window) & (s >= sink)
  pad = n * block - seq_len
  as_blocks = lambda m: (
    np.pad(m, ((0, pad), (0, pad))).reshape(n, block, n, block).sum((1, 3))
  )
  total = as_blocks(causal)
  return as_blocks(dropped) / np.maximum(total, 1)


def candidate_costs(
  influence_LxHxIxJ,
  candidates: Sequence[tuple[float, float]],
  seq_len: int,
  block: int,
  sink: int = 0,
  monotone: bool = True,
) -> np.ndarray:
  """Predicted loss increase `[layers, heads, C]` of each candidate rule.

  Args:
    influence_LxHxIxJ: block influence at length `seq_len`.
    candidates: C rules (alpha, beta).
    seq_len: the profiled length N.
    block: the block size used when profiling.
    sink: sink length of the masks.
    monotone: return the monotone envelope of the raw costs (module
      docstring): `max(0, max over rules with a window >= the rule's)`.

  Returns:
    cost[l, h, c] = sum over blocks of influence * dropped fraction, or its
    envelope.

  Example:
    >>> e = np.zeros((1, 1, 2, 2)); e[..., 1, 0] = -1.0  # dropping helps
    >>> candidate_costs(e, [(1, 0), (4, 0)], 4, 2, monotone=False)
    array([[[-1.,  0.]]])
    >>> candidate_costs(e, [(1, 0), (4, 0)], 4, 2)
    array([[[0., 0.]]])
  """
  influence = np.asarray(influence_LxHxIxJ, np.float64)
  alphas, betas = np.asarray(candidates, np.float64).T
  windows = ops.moa_windows(alphas, betas, seq_len)
  dropped = np.stack(
    [dropped_block_fraction(int(w), seq_len, block, sink) for w in windows]
  )
  costs = np.einsum("lhij,cij->lhc", influence, dropped)
  if not monotone:
    return costs
  widest_first = np.argsort(-windows, kind="stable")
  envelope = np.maximum.accumulate(
    np.maximum(costs[..., widest_first], 0.0), axis=-1
  )
  # Rules of equal window drop the same pairs: they share the largest cost.
  for w in np.unique(windows):
    same = windows[widest_first] == w
    envelope[..., same] = envelope[..., same].max(-1, keepdims=True)
  out = np.empty_like(envelope)
  out[..., widest_first] = envelope
  return out


def search_plan(
  costs_NxLxHxC,
  densities_NxC,
  budget: float,
  max_rules_per_layer: int | None = None,
) -> np.ndarray:
  """Exact choice of one candidate per head (MILP, HiGHS): the least total
  cost, and among plans of that cost the densest.

  Args:
    costs_NxLxHxC: predicted loss increase per profiled length N, layer,
      head and candidate.
    densities_NxC: density of each candidate at each length.
    budget: largest mean density over all heads, at every length.
    max_rules_per_layer: optional limit K on distinct candidates per layer.

  Returns:
    int `[layers, heads]` candidate indices.

  Raises:
    ValueError: on mismatched shapes, a budget outside (0, 1], or an
      infeasible problem (budget below the sparsest candidates).

  Example:
    >>> costs = np.array([[[[1.0, 0.0], [3.0, 0.0]]]])  # N=1, L=1, H=2, C=2
    >>> search_plan(costs, np.array([[0.2, 1.0]]), budget=0.6).tolist()
    [[0, 1]]
  """
  costs = np.asarray(costs_NxLxHxC, np.float64)
  dens = np.asarray(densities_NxC, np.float64)
  _checks.check_rank(
    "costs_NxLxHxC", costs, 4, "[lengths, layers, heads, candidates]"
  )
  n_len, n_layers, n_heads, n_cand = costs.shape
  _checks.check_shape(
    "densities_NxC", dens, (n_len, n_cand), "[lengths, candidates]"
  )
  if not 0.0 < budget <= 1.0:
    raise ValueError(f"`budget` must be in (0, 1], got {budget}.")
  n_x = n_layers * n_heads * n_cand
  use_k = max_rules_per_layer is not None and max_rules_per_layer < n_cand
  n_y = n_layers * n_cand if use_k else 0
  objective = np.concatenate([costs.sum(0).ravel(), np.zeros(n_y)])
  head_of_x = np.repeat(np.arange(n_layers * n_heads), n_cand)
  rows = [
    (
      sparse.csr_matrix(
        (np.ones(n_x), (head_of_x, np.arange(n_x))),
        shape=(n_layers * n_heads, n_x + n_y),
      ),
      1.0,
      1.0,
    )
  ]
  dens_x = np.tile(dens, (1, n_layers * n_heads))  # [N, n_x]
  rows.append(
    (
      sparse.csr_matrix(np.pad(dens_x, ((0, 0), (0, n_y)))),
      -np.inf,
      budget * n_layers * n_heads,
    )
  )
  if use_k:
    k = _checks.check_positive_int("max_rules_per_layer", max_rules_per_layer)
    x_idx = np.arange(n_x)
    layer, cand = x_idx // (n_heads * n_cand), x_idx % n_cand
    y_of_x = n_x + layer * n_cand + cand
    link = sparse.csr_matrix(
      (
        np.concatenate([np.ones(n_x), -np.ones(n_x)]),
        (np.concatenate([x_idx, x_idx]), np.concatenate([x_idx, y_of_x])),
      ),
      shape=(n_x, n_x + n_y),
    )  # x - y <= 0
    per_layer = sparse.csr_matrix(
      (np.ones(n_y), (np.arange(n_y) // n_cand, n_x + np.arange(n_y))),
      shape=(n_layers, n_x + n_y),
    )
    rows += [(link, -np.inf, 0.0), (per_layer, -np.inf, float(k))]
  least = _solve(objective, rows, budget)
  # Second pass: the densest plan whose cost is the least (up to rounding).
  slack = 1e-9 * max(1.0, abs(least.fun))
  rows.append((sparse.csr_matrix(objective), -np.inf, least.fun + slack))
  density = np.concatenate([dens_x.sum(0), np.zeros(n_y)])
  densest = _solve(-density, rows, budget)
  x = np.round(densest.x[:n_x]).reshape(n_layers, n_heads, n_cand)
  return x.argmax(-1)


def _solve(objective, rows, budget: float):
  """`scipy.optimize.milp` over 0/1 variables with `rows` of
  `(matrix, lower, upper)`; ValueError naming `budget` if infeasible."""
  result = optimize.milp(
    objective,
    constraints=[optimize.LinearConstraint(a, lo, hi) for a, lo, hi in rows],
    integrality=np.ones(len(objective)),
    bounds=optimize.Bounds(0, 1),
  )
  if not result.success:
    raise ValueError(f"No plan meets `budget`={budget}: {result.message}")
  return result


def plan_from_choice(choice_LxH, candidates) -> ops.MoAPlan:
  """The MoAPlan that gives head (l, h) the rule `candidates[choice[l, h]]`."""
  rules = np.asarray(candidates, np.float64)[np.asarray(choice_LxH)]
  as_rows = lambda a: tuple(tuple(float(x) for x in r) for r in a)
  return ops.MoAPlan(as_rows(rules[..., 0]), as_rows(rules[..., 1]))
