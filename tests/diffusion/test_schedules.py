"""Schedules: published values, conventions, identities and bad input."""

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from lightning_jax import diffusion


def test_karras_18_reproduces_edm():
  # EDM (Karras et al., 2022) `edm_sampler`: num_steps=18, sigma_min=0.002,
  # sigma_max=80, rho=7, t_N = 0; written out as in the paper's Eq. 5.
  i = np.arange(18)
  edm = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
  got = diffusion.karras_sigmas(18)
  assert got.shape == (19,) and got[-1] == 0.0
  np.testing.assert_allclose(got[:-1], edm, rtol=1e-12)
  assert got[0] == 80.0 and abs(got[17] - 0.002) < 1e-15
  # 18 steps: 35 denoiser calls with Heun (EDM's NFE for CIFAR-10).
  assert 2 * (len(got) - 1) - 1 == 35


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_vp_sigmas_at_ays_timesteps_reproduce_published_sigmas(name):
  got = diffusion.vp_sigmas(diffusion.AYS_TIMESTEPS[name])
  published = np.asarray(diffusion.AYS_NOISE_LEVELS[name])
  # NVIDIA's table has 10 decimals: agreement to its rounding.
  np.testing.assert_allclose(got, published, rtol=0, atol=5e-10)
  # ... and so within the 3-decimal rounding of the project page's first
  # and last values (14.615 and 0.029) as well.
  np.testing.assert_allclose(got[[0, -1]], [14.615, 0.029], atol=5e-4)


def test_vp_timesteps_inverts_vp_sigmas():
  t = np.array([0.0, 0.5, 13.0, 500.25, 998.9, 999.0])
  np.testing.assert_allclose(
    diffusion.vp_timesteps(diffusion.vp_sigmas(t)), t, atol=1e-9
  )
  with pytest.raises(ValueError, match="timesteps"):
    diffusion.vp_sigmas([1000.0])
  with pytest.raises(ValueError, match="sigmas"):
    diffusion.vp_timesteps([100.0])


@hypothesis.given(
  levels=st.lists(st.floats(-6.0, 6.0), min_size=2, max_size=30, unique=True),
  num=st.integers(2, 60),
)
def test_loglinear_interp_identity_and_monotone(levels, num):
  s = np.exp(np.sort(np.asarray(levels))[::-1])
  hypothesis.assume(np.all(np.diff(np.log(s)) < -1e-6))
  np.testing.assert_allclose(
    diffusion.loglinear_interp(s, len(s)), s, rtol=1e-12
  )
  out = diffusion.loglinear_interp(s, num)
  assert out.shape == (num,)
  assert np.all(np.diff(out) < 0)
  np.testing.assert_allclose(out[[0, -1]], s[[0, -1]], rtol=1e-12)


def test_ays_conventions():
  table = np.asarray(diffusion.AYS_NOISE_LEVELS["sd15"])
  replace = diffusion.ays_sigmas("sd15", 10)
  np.testing.assert_allclose(replace, np.append(table[:-1], 0.0), rtol=1e-12)
  append = diffusion.ays_sigmas("sd15", 10, final="append")
  assert append.shape == (11,) and append[-1] == 0.0
  np.testing.assert_allclose(append[[0, -2]], table[[0, -1]], rtol=1e-12)
  for name in diffusion.AYS_NOISE_LEVELS:
    for n in (1, 4, 25):
      for final in ("replace", "append"):
        s = diffusion.ays_sigmas(name, n, final=final)
        assert s.shape == (n + 1,) and s[-1] == 0.0
        diffusion.check_schedule(s)
  with pytest.raises(ValueError, match="name"):
    diffusion.ays_sigmas("sd3", 10)
  with pytest.raises(ValueError, match="final"):
    diffusion.ays_sigmas("sd15", 10, final="drop")


def test_kl_optimal_is_linear_in_atan():
  for c in (0.5, 1.0, 3.0):
    s = diffusion.kl_optimal_sigmas(9, 0.002, 80.0, data_std=c)
    a = np.arctan(s[:-1] / c)
    np.testing.assert_allclose(np.diff(a), np.diff(a)[0], rtol=1e-9)
    np.testing.assert_allclose(s[[0, -2, -1]], [80.0, 0.002, 0.0], rtol=1e-12)


def test_exponential_is_loglinear():
  s = diffusion.exponential_sigmas(7, 0.01, 100.0)
  np.testing.assert_allclose(
    np.diff(np.log(s[:-1])), np.log(1e-4) / 6, rtol=1e-12
  )


@pytest.mark.parametrize(
  "fn",
  [
    diffusion.karras_sigmas,
    diffusion.exponential_sigmas,
    diffusion.kl_optimal_sigmas,
  ],
)
def test_bad_schedule_arguments(fn):
  for n in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match="`n`"):
      fn(n)
  with pytest.raises(ValueError, match="sigma_min"):
    fn(5, 1.0, 0.5)
  with pytest.raises(ValueError, match="sigma_min"):
    fn(5, -1.0, 0.5)
  assert fn(1).shape == (2,)


@pytest.mark.parametrize(
  "sigmas,match",
  [
    ([3.0, 3.0, 0.0], r"decreasing, but sigmas\[0\] = 3.0 <= sigmas\[1\]"),
    ([3.0, 1.0, 2.0], r"decreasing, but sigmas\[1\] = 1.0 <= sigmas\[2\]"),
    ([0.0, 1.0, 3.0], r"strictly decreasing .*increasing schedule.*reversed"),
    ([3.0, -1.0], "> 0"),
    ([3.0, np.nan], "finite"),
    ([3.0], "at least 2"),
  ],
)
def test_check_schedule_errors(sigmas, match):
  with pytest.raises(ValueError, match=match):
    diffusion.check_schedule(sigmas)


def test_loglinear_interp_rejects_zero_and_short():
  with pytest.raises(ValueError, match="> 0"):
    diffusion.loglinear_interp([2.0, 1.0, 0.0], 5)
  with pytest.raises(ValueError, match="num"):
    diffusion.loglinear_interp([2.0, 1.0], 1)
