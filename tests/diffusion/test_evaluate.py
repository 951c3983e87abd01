"""Metrics: sliced Wasserstein identities, schedule comparison rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax import diffusion


def test_sliced_wasserstein_identities():
  x = jax.random.normal(jax.random.key(0), (2048, 2))
  key = jax.random.key(1)
  assert float(diffusion.sliced_wasserstein(x, x, key)) == 0.0
  # A shift by (c, 0) moves every projection by c theta_x, so SW2 =
  # c sqrt(E theta_x^2) = c / sqrt(2); 1024 directions: within 5%.
  c = 0.8
  sw = diffusion.sliced_wasserstein(
    x, x + jnp.array([c, 0.0])[None], key, num_projections=1024
  )
  np.testing.assert_allclose(sw, c / np.sqrt(2), rtol=0.05)
  # Permutation invariant.
  perm = jax.random.permutation(jax.random.key(2), x)
  assert float(diffusion.sliced_wasserstein(x, perm, key)) < 1e-6
  with pytest.raises(ValueError, match="`y`"):
    diffusion.sliced_wasserstein(x, x[:10], key)


def test_compare_schedules_rows():
  mix = diffusion.toy_density("gaussian")
  scheds = {
    "karras": diffusion.karras_sigmas(4, 0.01, 10.0),
    "loglinear": diffusion.exponential_sigmas(4, 0.01, 10.0),
  }
  rows = diffusion.compare_schedules(
    mix, scheds, ["euler"], seeds=(0, 1), num_samples=256, num_projections=32
  )
  names = sorted((r["sampler"], r["schedule"]) for r in rows)
  assert names == [
    ("euler", "karras"),
    ("euler", "loglinear"),
    ("exact", "exact"),
  ]
  for r in rows:
    assert all(np.isfinite(r[k]) for k in ("nll_gap", "sw2", "sw2_std"))
  with pytest.raises(ValueError, match="sigma_0"):
    diffusion.compare_schedules(
      mix,
      {
        "a": diffusion.karras_sigmas(4, 0.01, 10.0),
        "b": diffusion.karras_sigmas(4, 0.01, 20.0),
      },
      ["euler"],
    )
  with pytest.raises(ValueError, match="sampler_names"):
    diffusion.compare_schedules(mix, scheds, ["rk4"])


def test_sample_quality_fn_deterministic_and_sensitive():
  mix = diffusion.toy_density("gaussian")
  metric = diffusion.sample_quality_fn(
    mix, "euler", num_samples=512, num_projections=32
  )
  good = diffusion.karras_sigmas(20, 0.01, 20.0)[:-1]
  bad = np.array([20.0, 0.01])  # one Euler step from 20 to 0.01, then 0
  assert metric(good) == metric(good)
  assert metric(good) < metric(bad)
