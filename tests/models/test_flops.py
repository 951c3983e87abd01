"""Parameter and FLOP counts: hand-checked cases (each mixer's formula is a
required field of its registry record)."""

import pytest

from lightning_jax import models


def test_transformer_counts_by_hand():
  d, layers, t, v = 128, 4, 64, 256
  cfg = models.get_preset("transformer", vocab_size=v)
  # Per layer: q, k, v, o (4 d^2), SwiGLU (3 d 3d), two norm scales (2 d).
  block = 4 * d * d + 3 * d * 3 * d + 2 * d
  assert models.non_embedding_params(cfg) == layers * block + d
  weights = layers * (4 * d * d + 9 * d * d)
  attention = layers * 4 * d * (t + 1) / 2  # H Dh = d, mean context
  forward = 2 * weights + 2 * d * v + attention
  assert models.flops_per_token(cfg, t) == pytest.approx(3 * forward)


def test_recurrent_mixing_and_active_experts_by_hand():
  d, t = 128, 64
  dense = models.get_preset("tnl")
  # The mixing of a TNL layer is 5 H Dk Dv and independent of T.
  assert models.flops_per_token(dense, 2 * t) == models.flops_per_token(
    dense, t
  )
  moe = models.get_preset("moe-hybrid", pattern=("lightning",))
  with_all = moe.__class__(**{**moe.__dict__, "top_k": moe.num_experts})
  # Expert FLOPs scale with top_k: 3 GLU matrices d x moe_d_ff per expert.
  per_expert = 2 * 3 * d * moe.moe_d_ff * 3 * moe.num_layers
  delta = models.flops_per_token(with_all, t) - models.flops_per_token(moe, t)
  assert delta == pytest.approx(per_expert * (moe.num_experts - moe.top_k))


def test_active_params_count_the_chosen_experts():
  moe = models.get_preset("moe-hybrid", pattern=("lightning",))
  with_all = moe.__class__(**{**moe.__dict__, "top_k": moe.num_experts})
  assert models.active_params(with_all) == models.num_params(moe)
  per_expert = 3 * moe.d_model * moe.moe_d_ff * moe.num_layers
  assert models.active_params(moe) == models.num_params(moe) - per_expert * (
    moe.num_experts - moe.top_k
  )
  dense = models.get_preset("transformer")
  assert models.active_params(dense) == models.num_params(dense)
