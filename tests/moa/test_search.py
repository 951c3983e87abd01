"""MoA search: the MILP optimum equals brute force (least cost, then
densest); block coverage is exact; costs are monotone envelopes."""

import itertools

import hypothesis
from hypothesis import strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import ops
from lightning_jax.moa import search


def _brute_force(costs, dens, budget, max_rules):
  """The least total cost over all assignments, ties to the densest."""
  n_len, n_layers, n_heads, n_cand = costs.shape
  best, best_choice = (np.inf, 0.0), None
  for flat in itertools.product(range(n_cand), repeat=n_layers * n_heads):
    choice = np.array(flat).reshape(n_layers, n_heads)
    if max_rules and any(len(set(r)) > max_rules for r in choice):
      continue
    if (dens[:, choice].mean((1, 2)) > budget + 1e-12).any():
      continue
    total = np.take_along_axis(costs, choice[None, ..., None], -1).sum()
    key = (total, -dens[:, choice].sum())
    if key < best:
      best, best_choice = key, choice
  return best[0], best_choice


@hypothesis.given(
  seed=st.integers(0, 2**16),
  budget=st.floats(0.3, 0.9),
  max_rules=st.sampled_from([None, 1, 2]),
)
def test_milp_equals_brute_force(seed, budget, max_rules):
  rng = np.random.default_rng(seed)
  costs = rng.normal(size=(2, 2, 3, 3))  # 2 lengths, 2 layers, 3 heads, 3 rules
  dens = np.sort(rng.uniform(0.05, 1.0, size=(2, 3)), axis=1)
  costs -= 2.0 * dens[:, None, None, :]  # denser rules lose less
  best, want = _brute_force(costs, dens, budget, max_rules)
  if want is None:
    with pytest.raises(ValueError, match="budget"):
      search.search_plan(costs, dens, budget, max_rules)
    return
  got = search.search_plan(costs, dens, budget, max_rules)
  got_total = np.take_along_axis(costs, got[None, ..., None], -1).sum()
  np.testing.assert_allclose(got_total, best, rtol=1e-9, atol=1e-9)
  np.testing.assert_array_equal(got, want)  # continuous costs: unique optimum


@hypothesis.given(seed=st.integers(0, 2**16), budget=st.floats(0.3, 0.9))
def test_ties_go_to_the_densest_plan(seed, budget):
  rng = np.random.default_rng(seed)
  costs = rng.integers(0, 2, size=(1, 2, 3, 3)).astype(float)  # many ties
  dens = np.array([[0.1, 0.5, 1.0]])
  best, want = _brute_force(costs, dens, budget, None)
  got = search.search_plan(costs, dens, budget)
  got_total = np.take_along_axis(costs, got[None, ..., None], -1).sum()
  assert got_total == best
  np.testing.assert_allclose(dens[:, got].sum(), dens[:, want].sum())


def test_zero_costs_spend_the_budget():
  """All rules predicted free: the densest plan under the budget, not the
  sparsest (the failure of the toy MoA reproduction)."""
  dens = np.array([[0.1, 0.3, 1.0]])
  got = search.search_plan(np.zeros((1, 2, 2, 3)), dens, budget=0.5)
  assert dens[0, got].mean() == pytest.approx(0.475)  # 1.0 + 3 x 0.3


@hypothesis.given(
  seed=st.integers(0, 2**16),
  seq=st.integers(4, 24),
  block=st.sampled_from([1, 4]),
)
def test_monotone_costs_are_the_envelope(seed, seq, block):
  rng = np.random.default_rng(seed)
  n = -(-seq // block)
  influence = rng.normal(size=(2, 2, n, n))
  candidates = [(a, b) for a in (0, 1, 3, 8) for b in (0, 0.25, 1)]
  raw = search.candidate_costs(
    influence, candidates, seq, block, monotone=False
  )
  env = search.candidate_costs(influence, candidates, seq, block)
  windows = ops.moa_windows(*np.asarray(candidates).T, seq)
  for c, w in enumerate(windows):
    wider = windows >= w  # dropped sets nested: these drop a subset
    np.testing.assert_allclose(
      env[..., c], np.maximum(raw[..., wider].max(-1), 0.0)
    )


@hypothesis.given(
  window=st.integers(1, 30),
  seq=st.integers(1, 30),
  block=st.sampled_from([1, 4, 7]),
  sink=st.integers(0, 6),
)
def test_dropped_fraction_matches_the_mask(window, seq, block, sink):
  dropped = search.dropped_block_fraction(window, seq, block, sink)
  kept = np.asarray(ops.moa_mask(jnp.asarray([window]), seq, sink))[0]
  causal = np.tril(np.ones((seq, seq), bool))
  n = -(-seq // block)
  pad = ((0, n * block - seq),) * 2
  blocks = lambda m: np.pad(m, pad).reshape(n, block, n, block).sum((1, 3))
  np.testing.assert_allclose(
    dropped * blocks(causal), blocks(causal & ~kept), atol=1e-9
  )


def test_candidate_costs_sum_the_dropped_influence():
  rng = np.random.default_rng(0)
  seq, sink = 12, 2
  influence = rng.normal(size=(2, 3, seq, seq))  # per element (block 1)
  candidates = [(1.0, 0.0), (0.0, 0.5), (100.0, 0.0)]
  costs = search.candidate_costs(
    influence, candidates, seq, 1, sink, monotone=False
  )
  for c, (alpha, beta) in enumerate(candidates):
    window = ops.moa_windows([alpha], [beta], seq)
    kept = np.asarray(ops.moa_mask(jnp.asarray(window), seq, sink))[0]
    dropped = np.tril(np.ones((seq, seq), bool)) & ~kept
    np.testing.assert_allclose(costs[..., c], (influence * dropped).sum((2, 3)))
  np.testing.assert_array_equal(costs[..., 2], 0.0)  # dense rule drops nothing


def test_plan_from_choice_and_bad_budget():
  candidates = [(8.0, 0.0), (0.0, 0.5)]
  plan = search.plan_from_choice(np.array([[0, 1], [1, 1]]), candidates)
  assert plan.alphas == ((8.0, 0.0), (0.0, 0.0))
  assert plan.betas == ((0.0, 0.5), (0.5, 0.5))
  with pytest.raises(ValueError, match="`budget`"):
    search.search_plan(np.zeros((1, 1, 1, 2)), np.ones((1, 2)), 1.5)
  with pytest.raises(ValueError, match="`densities_NxC`"):
    search.search_plan(np.zeros((1, 1, 1, 2)), np.ones((2, 2)), 0.5)
