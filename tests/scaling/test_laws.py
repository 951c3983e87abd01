"""Loss-law fits recover known coefficients; compute-optimal sizes, the
error law and bootstrap intervals; bad runs fail naming the argument."""

import numpy as np
import pytest
from scipy import optimize

from lightning_jax import scaling

# A 4 x 3 grid of runs: N params, M = D / N tokens per parameter.
N = np.repeat([1e7, 3e7, 1e8, 3e8], 3)
D = N * np.tile([5.0, 20.0, 80.0], 4)
OVERTRAINING = {"alpha": 80.0, "beta": 500.0, "eta": -0.3, "E": 1.8}
# Hoffmann et al. (2022) fit of their own runs.
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def _assert_close(fit, truth, rtol):
  assert set(fit) == set(truth)
  for k, v in truth.items():
    assert fit[k] == pytest.approx(v, rel=rtol), k


@pytest.mark.parametrize("truth", [OVERTRAINING, CHINCHILLA])
def test_fit_recovers_coefficients_within_1_percent(truth):
  form = scaling.form_of(truth)
  rng = np.random.default_rng(0)
  loss = scaling.predict(truth, N, D) * np.exp(1e-5 * rng.normal(size=N.size))
  _assert_close(scaling.fit_loss_law(N, D, loss, form), truth, 0.01)


def test_predict_by_hand():
  ones = {"E": 1.0, "A": 1.0, "B": 1.0, "alpha": 1.0, "beta": 1.0}
  assert scaling.predict(ones, 2.0, 4.0) == pytest.approx(1 + 1 / 2 + 1 / 4)
  # N = 2, M = 6 (D = 12): E + alpha N^eta + beta 6^(eta/2) (M N)^eta.
  c = {"alpha": 2.0, "beta": 3.0, "eta": -1.0, "E": 0.5}
  expected = 0.5 + 2.0 / 2 + 3.0 / np.sqrt(6) / 12
  assert scaling.predict(c, 2.0, 12.0) == pytest.approx(expected)
  mapped = scaling.as_chinchilla(c)
  assert mapped == pytest.approx(
    {"E": 0.5, "A": 2.0, "B": 3.0 / np.sqrt(6), "alpha": 1.0, "beta": 1.0}
  )


def test_compute_optimal_by_hand():
  # A = B, alpha = beta = 1/2: G = 1 and N_opt = D_opt = sqrt(C / 6).
  c = {"E": 1.0, "A": 3.0, "B": 3.0, "alpha": 0.5, "beta": 0.5}
  n_opt, d_opt = scaling.compute_optimal(c, 6e4)
  assert (n_opt, d_opt) == pytest.approx((100.0, 100.0))


@pytest.mark.parametrize("truth", [OVERTRAINING, CHINCHILLA])
def test_compute_optimal_closed_form_is_the_numerical_minimum(truth):
  for compute in (1e18, 1e21, 1e24):
    n_opt, d_opt = scaling.compute_optimal(truth, compute)
    assert 6 * n_opt * d_opt == pytest.approx(compute)
    numeric = optimize.minimize_scalar(
      lambda log_n, c=compute: scaling.predict(
        truth, np.exp(log_n), c / (6 * np.exp(log_n))
      ),
      bounds=(np.log(1e3), np.log(compute / 6e3)),
      method="bounded",
      options={"xatol": 1e-10},
    )
    assert np.log(n_opt) == pytest.approx(numeric.x, abs=1e-4)


def test_overtraining_optimum_has_constant_tokens_per_param():
  m = [
    np.divide(*scaling.compute_optimal(OVERTRAINING, c)[::-1])
    for c in (1e18, 1e22)
  ]
  assert m[0] == pytest.approx(m[1])


def test_error_law_recovers_coefficients():
  truth = {"epsilon": 0.9, "k": 20.0, "gamma": 1.2}
  loss = np.linspace(2.0, 5.0, 8)
  fit = scaling.fit_error_law(loss, scaling.predict_error(truth, loss))
  _assert_close(fit, truth, 1e-6)
  assert scaling.predict_error(truth, 0.0) == pytest.approx(0.9 - 20.0)


def test_bootstrap_intervals_cover_the_truth_and_are_seeded():
  rng = np.random.default_rng(1)
  loss = scaling.predict(OVERTRAINING, N, D) * np.exp(
    3e-3 * rng.normal(size=N.size)
  )
  boot = scaling.bootstrap(N, D, loss, "overtraining", num_samples=60, seed=3)
  for k, v in OVERTRAINING.items():
    low, high = boot.intervals[k]
    assert low <= v <= high, (k, low, high)
    assert low <= boot.estimate[k] <= high
  assert boot.samples["eta"].shape == (60,)
  again = scaling.bootstrap(N, D, loss, "overtraining", num_samples=60, seed=3)
  np.testing.assert_array_equal(again.samples["E"], boot.samples["E"])


@pytest.mark.parametrize(
  "n, d, loss, match",
  [
    (N[:3], D[:3], np.ones(3), "distinct"),
    (np.r_[N[:-1], 0.0], D, np.full(N.size, 2.0), "n_params"),
    (N, np.r_[D[:-1], -1.0], np.full(N.size, 2.0), "n_tokens"),
    (N, D, np.r_[np.full(N.size - 1, 2.0), np.nan], "loss"),
    (N, D[:-1], np.full(N.size, 2.0), "one length"),
    (N[None], D[None], np.full((1, N.size), 2.0), "1-D"),
  ],
)
def test_bad_runs_fail_naming_the_argument(n, d, loss, match):
  with pytest.raises(ValueError, match=match):
    scaling.fit_loss_law(n, d, loss, "overtraining")


def test_bad_arguments_fail_clearly():
  loss = scaling.predict(OVERTRAINING, N, D)
  with pytest.raises(ValueError, match="`form` must be one of"):
    scaling.fit_loss_law(N, D, loss, "kaplan")
  with pytest.raises(ValueError, match="`coefficients` must have the keys"):
    scaling.predict({"E": 1.0}, N, D)
  with pytest.raises(ValueError, match="eta < 0"):
    scaling.compute_optimal(dict(OVERTRAINING, eta=0.1), 1e20)
  with pytest.raises(ValueError, match="`compute`"):
    scaling.compute_optimal(OVERTRAINING, -1.0)
  with pytest.raises(ValueError, match="`level`"):
    scaling.bootstrap(N, D, loss, level=1.5)
  with pytest.raises(ValueError, match="`error`"):
    scaling.fit_error_law([2.0, 3.0, 4.0], [0.5, 0.4])
  with pytest.raises(ValueError, match=">= 3 distinct"):
    scaling.fit_error_law([2.0, 2.0, 3.0], [0.5, 0.5, 0.4])
