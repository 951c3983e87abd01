"""Loss scaling laws: fits, predictions and compute-optimal allocation.

Two forms of the loss of a model of N parameters trained on D tokens:

* "overtraining" (Gadre et al., 2024, "Language models scale reliably with
  over-training and on downstream tasks", arXiv 2403.08540, Eq. 4 as fitted
  in their code, mlfoundations/scaling `scaling/laws.py`), with M = D / N
  tokens per parameter:

      L(N, M) = E + alpha N^eta + beta 6^(eta / 2) (M N)^eta

  fitted by ordinary least squares on L itself (Levenberg-Marquardt) from
  their grid of 128 starts, keeping the lowest residual.

* "chinchilla" (Hoffmann et al., 2022, "Training compute-optimal large
  language models", arXiv 2203.15556, App. D.2):

      L(N, D) = E + A / N^alpha + B / D^beta

  fitted as log L = LSE(a - alpha log N, b - beta log D, e) (A = e^a,
  B = e^b, E = e^e) under a Huber loss (delta = 1e-3) of the log residuals,
  L-BFGS from their grid of 4500 starts, keeping the lowest objective.

Both are `E + A N^-p + B D^-q`; the overtraining form has one exponent
(p = q = -eta) and B = beta 6^(eta / 2). `as_chinchilla` maps it so, and
prediction and the compute-optimal allocation (C = 6 N D) are written once
for that shape. Coefficients travel as dicts `{name: float}`; the form is
told by the names (`form_of`). docs/scaling.md has the derivations.
"""

import itertools
from typing import Callable, NamedTuple
import warnings

import numpy as np
from scipy import optimize

HUBER_DELTA = 1e-3
# Chinchilla fit: steps of every grid start, then starts run to the end.
SCREEN_ITERS = 50
SURVIVORS = 64


class Form(NamedTuple):
  """A loss-law form.

  Attributes:
    names: the coefficients, in the order of `grid` columns.
    grid: `[starts, len(names)]` starting points of the fit.
    fit: `(log_n, log_d, loss, starts [S, len(names)]) -> (coefficients
      [S, len(names)], residual [S])`, the local fit from each start.
    as_chinchilla: coefficient dict -> `{E, A, B, alpha, beta}`.
  """

  names: tuple[str, ...]
  grid: np.ndarray
  fit: Callable[..., tuple[np.ndarray, np.ndarray]]
  as_chinchilla: Callable[[dict], dict]


def _product(*axes) -> np.ndarray:
  return np.array(list(itertools.product(*axes)), np.float64)


# ---- overtraining (Gadre et al. 2024) --------------------------------------


def _overtraining_terms(theta, log_n, log_d):
  """`(E + alpha N^eta + beta 6^(eta/2) D^eta, the two power terms)`."""
  alpha, beta, eta, e = theta
  t_n = alpha * np.exp(eta * log_n)
  t_d = beta * np.exp(eta * (0.5 * np.log(6.0) + log_d))
  return e + t_n + t_d, t_n, t_d


def _fit_overtraining(log_n, log_d, loss, starts):
  """Levenberg-Marquardt least squares on the loss values (as the authors'
  `curve_fit`), with the analytic Jacobian, from each of `[starts, (alpha,
  beta, eta, E)]`."""

  def residuals(theta):
    return _overtraining_terms(theta, log_n, log_d)[0] - loss

  def jacobian(theta):
    alpha, beta, _, _ = theta
    _, t_n, t_d = _overtraining_terms(theta, log_n, log_d)
    d_eta = t_n * log_n + t_d * (0.5 * np.log(6.0) + log_d)
    return np.stack(
      [t_n / alpha, t_d / beta, d_eta, np.ones_like(loss)], axis=1
    )

  fits = [
    optimize.least_squares(
      residuals,
      start,
      jac=jacobian,
      method="lm",
      max_nfev=2_000,
    )
    for start in starts
  ]
  return np.array([r.x for r in fits]), np.array([2 * r.cost for r in fits])


def _overtraining_as_chinchilla(c: dict) -> dict:
  return {
    "E": c["E"],
    "A": c["alpha"],
    "B": c["beta"] * 6.0 ** (c["eta"] / 2),
    "alpha": -c["eta"],
    "beta": -c["eta"],
  }


# ---- chinchilla (Hoffmann et al. 2022, App. D.2) ---------------------------


def _huber_objective(theta, log_n, log_d, log_loss):
  """Huber(delta) of `LSE(a - alpha log N, b - beta log D, e) - log L`,
  summed over runs and divided by delta^2 (the same minimiser, O(1) values),
  and its gradient, for a batch of `theta = [starts, (a, b, e, alpha,
  beta)]`: `([starts], [starts, 5])`."""
  a, b, e, alpha, beta = (theta[:, i : i + 1] for i in range(5))
  logits = np.stack(
    [a - alpha * log_n, b - beta * log_d, e + np.zeros_like(log_n)], axis=1
  )  # [starts, 3, runs]
  top = np.max(logits, axis=1, keepdims=True)
  weights = np.exp(logits - top)
  total = np.sum(weights, axis=1)
  lse = top[:, 0] + np.log(total)
  weights /= total[:, None]  # softmax: d LSE / d logits
  r = lse - log_loss
  huber = np.where(
    np.abs(r) <= HUBER_DELTA,
    0.5 * r**2,
    HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA),
  )
  slope = np.clip(r, -HUBER_DELTA, HUBER_DELTA)[:, None] * weights
  grad = np.concatenate(
    [
      np.sum(slope, axis=2),
      -np.sum(slope[:, :2] * np.stack([log_n, log_d]), axis=2),
    ],
    axis=1,
  )
  scale = HUBER_DELTA**-2
  return scale * np.sum(huber, axis=1), scale * grad


def _lbfgs(
  fun, x0, memory=10, max_iter=3000, max_step=1.0, gtol=1e-8, ftol=1e-12
):
  """L-BFGS (Nocedal & Wright, Alg. 7.4) with a backtracking Armijo line
  search, run on a batch of independent starts at once.

  Args:
    fun: `x [starts, p] -> (f [starts], grad [starts, p])`, row-wise.
    x0: `[starts, p]` starting points.

  Returns:
    `(x, f)` at convergence (`|grad|_inf <= gtol`, or a decrease
    `<= ftol max(|f|, 1)` as L-BFGS-B's `factr` test) or after `max_iter`
    steps, per start.
  """
  x = np.array(x0, np.float64)
  f, g = fun(x)
  s_hist = np.zeros((memory,) + x.shape)
  y_hist = np.zeros((memory,) + x.shape)
  rho = np.zeros((memory, x.shape[0]))
  active = np.isfinite(f)
  for it in range(max_iter):
    # Two-loop recursion: direction -H g, per start.
    q = g.copy()
    alphas = []
    for j in range(min(it, memory) - 1, -1, -1):
      a = rho[j] * np.sum(s_hist[j] * q, axis=1)
      q -= a[:, None] * y_hist[j]
      alphas.append((j, a))
    if it:
      j = (it - 1) % memory
      yy = np.sum(y_hist[j] ** 2, axis=1)
      gamma = np.where(rho[j] > 0, 1 / np.maximum(rho[j] * yy, 1e-300), 1.0)
    else:
      gamma = 1 / np.maximum(np.max(np.abs(g), axis=1), 1.0)
    r = gamma[:, None] * q
    for j, a in reversed(alphas):
      b = rho[j] * np.sum(y_hist[j] * r, axis=1)
      r += (a - b)[:, None] * s_hist[j]
    direction = -r
    slope = np.sum(direction * g, axis=1)
    bad = ~(slope < 0)
    direction[bad] = -g[bad]
    slope[bad] = -np.sum(g[bad] ** 2, axis=1)
    # At most `max_step` per coordinate (log-coefficients, exponents): in
    # the flat linear part of the Huber loss the curvature pairs ask for
    # huge steps that would take tens of halvings.
    shrink = np.minimum(1.0, max_step / np.max(np.abs(direction), axis=1))
    direction *= shrink[:, None]
    slope *= shrink
    # Backtracking until f decreases by 1e-4 of the linear prediction.
    step = np.ones_like(f)
    todo = active.copy()
    x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
    for _ in range(60):
      if not todo.any():
        break
      xt = x[todo] + step[todo, None] * direction[todo]
      ft, gt = fun(xt)
      ok = np.isfinite(ft) & (ft <= f[todo] + 1e-4 * step[todo] * slope[todo])
      idx = np.flatnonzero(todo)
      x_new[idx[ok]], f_new[idx[ok]], g_new[idx[ok]] = xt[ok], ft[ok], gt[ok]
      todo[idx[ok]] = False
      step[idx[~ok]] *= 0.5
    moved = active & ~todo
    j = it % memory
    s_hist[j] = np.where(moved[:, None], x_new - x, 0.0)
    y_hist[j] = np.where(moved[:, None], g_new - g, 0.0)
    sy = np.sum(s_hist[j] * y_hist[j], axis=1)
    rho[j] = np.where(sy > 1e-300, 1 / np.where(sy > 1e-300, sy, 1.0), 0.0)
    decrease = (f - f_new) / np.maximum(np.abs(f), 1.0)
    x, f, g = x_new, f_new, g_new
    active &= ~todo & (decrease > ftol) & (np.max(np.abs(g), axis=1) > gtol)
    if not active.any():
      break
  return x, f


def _fit_chinchilla(log_n, log_d, loss, starts):
  """L-BFGS on the Huber objective from `[starts, (E, A, B, alpha, beta)]`.

  It runs on centred logs, `a - alpha log N = (a - alpha m_N) - alpha (log N
  - m_N)` with m_N the mean log N (likewise D): the same model and optimum,
  but a and alpha are no longer nearly collinear, so L-BFGS converges in
  hundreds of steps instead of thousands. Every start runs `SCREEN_ITERS`
  steps; the `SURVIVORS` lowest then run to convergence (most of the grid
  sits on flat plateaus of the linear Huber branch by then).
  """
  e, big_a, big_b, alpha, beta = starts.T
  m_n, m_d = np.mean(log_n), np.mean(log_d)
  theta0 = np.stack(
    [np.log(big_a) - alpha * m_n, np.log(big_b) - beta * m_d, np.log(e)]
    + [alpha, beta],
    axis=1,
  )
  fun = lambda t: _huber_objective(t, log_n - m_n, log_d - m_d, np.log(loss))
  theta, objective = _lbfgs(fun, theta0, max_iter=SCREEN_ITERS)
  if len(theta) > SURVIVORS:
    keep = np.argsort(np.nan_to_num(objective, nan=np.inf))[:SURVIVORS]
    theta, objective = _lbfgs(fun, theta[keep])
  a, b, e, alpha, beta = theta.T
  a, b = a + alpha * m_n, b + beta * m_d
  coefficients = np.stack(
    [np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=1
  )
  return coefficients, objective


def _chinchilla_grid() -> np.ndarray:
  """Hoffmann et al.'s grid, as `(E, A, B, alpha, beta)` starts."""
  exps = np.arange(0.0, 2.01, 0.5)
  logs = np.arange(0.0, 25.1, 5.0)
  lse = _product(exps, exps, np.arange(-1.0, 1.01, 0.5), logs, logs)
  alpha, beta, e, a, b = lse.T
  return np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=1)


FORMS = {
  "overtraining": Form(
    names=("alpha", "beta", "eta", "E"),
    grid=_product(
      [1e2, 3e2, 1e3, 3e3], [1e2, 3e2, 1e3, 3e3], [-0.1, -0.3], [0, 1, 2, 10]
    ),
    fit=_fit_overtraining,
    as_chinchilla=_overtraining_as_chinchilla,
  ),
  "chinchilla": Form(
    names=("E", "A", "B", "alpha", "beta"),
    grid=_chinchilla_grid(),
    fit=_fit_chinchilla,
    as_chinchilla=dict,
  ),
}


# ---- checks ----------------------------------------------------------------


def get_form(form: str) -> Form:
  """The `Form` record of `form`; ValueError listing the known ones."""
  if form not in FORMS:
    raise ValueError(f"`form` must be one of {list(FORMS)}, got {form!r}.")
  return FORMS[form]


def form_of(coefficients: dict) -> str:
  """The form whose coefficient names are the keys of `coefficients`.

  Raises:
    ValueError: the keys match no form.
  """
  for name, form in FORMS.items():
    if set(coefficients) == set(form.names):
      return name
  raise ValueError(
    f"`coefficients` must have the keys of one form "
    f"({ {k: list(f.names) for k, f in FORMS.items()} }), got "
    f"{sorted(coefficients)}."
  )


def _positive(name: str, x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if not np.all(np.isfinite(x)) or np.any(x <= 0):
    raise ValueError(f"`{name}` must be finite and > 0, got {x}.")
  return x


def _vector(name: str, x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 1:
    raise ValueError(f"`{name}` must be 1-D [runs], got shape {x.shape}.")
  return _positive(name, x)


def check_runs(n_params, n_tokens, loss, num_coefficients: int):
  """`(N, D, L)` as float64 `[runs]` arrays, checked.

  Raises:
    ValueError: not 1-D, lengths differ, a value that is not finite and
      > 0, or fewer distinct (N, D) points than `num_coefficients`.
  """
  n = _vector("n_params", n_params)
  d = _vector("n_tokens", n_tokens)
  loss = _vector("loss", loss)
  if not n.shape == d.shape == loss.shape:
    raise ValueError(
      f"`n_params`, `n_tokens` and `loss` must have one length, got "
      f"{n.size}, {d.size} and {loss.size}."
    )
  points = len(set(zip(n.tolist(), d.tolist(), strict=True)))
  if points < num_coefficients:
    raise ValueError(
      f"`n_params`, `n_tokens` must hold >= {num_coefficients} distinct "
      f"(N, D) points to fit {num_coefficients} coefficients, got {points}."
    )
  return n, d, loss


# ---- public API ------------------------------------------------------------


def fit_loss_law(
  n_params, n_tokens, loss, form: str = "overtraining", starts=None
) -> dict:
  """Fits a loss law to runs (N params, D tokens, final loss L).

  Args:
    n_params: `[runs]` parameter counts N > 0.
    n_tokens: `[runs]` training tokens D > 0.
    loss: `[runs]` losses L > 0 (held-out).
    form: "overtraining" (Gadre et al. 2024; returns alpha, beta, eta, E)
      or "chinchilla" (Hoffmann et al. 2022; returns E, A, B, alpha, beta).
    starts: optional coefficient dicts of this form to start from instead
      of the paper's grid (e.g. a previous fit, as `bootstrap` does).

  Returns:
    `{name: value}`, the fit of the lowest residual (squared loss error for
    "overtraining", the Huber objective for "chinchilla").

  Raises:
    ValueError: bad runs (`check_runs`), unknown form, or no start
      converged to finite coefficients.

  Example:
    >>> n = np.repeat([1e7, 1e8, 1e9], 3)
    >>> d = n * np.tile([5.0, 20.0, 80.0], 3)
    >>> c = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}
    >>> fit = fit_loss_law(n, d, predict(c, n, d), "chinchilla")
    >>> round(fit["alpha"], 3)
    0.34
  """
  record = get_form(form)
  n, d, loss = check_runs(n_params, n_tokens, loss, len(record.names))
  grid = record.grid
  if starts is not None:
    grid = np.array([[s[k] for k in record.names] for s in starts], np.float64)
  with warnings.catch_warnings(), np.errstate(all="ignore"):
    warnings.simplefilter("ignore")  # overflow at far-off starts
    theta, residual = record.fit(np.log(n), np.log(d), loss, grid)
  residual = np.where(np.all(np.isfinite(theta), axis=1), residual, np.nan)
  if np.all(np.isnan(residual)):
    raise ValueError(f"No start of the {form!r} fit converged.")
  best = theta[np.nanargmin(residual)]
  return dict(zip(record.names, best.tolist(), strict=True))


def as_chinchilla(coefficients: dict) -> dict:
  """Coefficients of either form as `{E, A, B, alpha, beta}` of
  `E + A / N^alpha + B / D^beta` (overtraining: A = alpha, B = beta
  6^(eta/2), both exponents -eta)."""
  return FORMS[form_of(coefficients)].as_chinchilla(coefficients)


def predict(coefficients: dict, n_params, n_tokens) -> np.ndarray:
  """The law's loss at N params and D tokens (broadcast).

  Example:
    >>> c = {"E": 1.0, "A": 1.0, "B": 1.0, "alpha": 1.0, "beta": 1.0}
    >>> float(predict(c, 2.0, 4.0))
    1.75
  """
  c = as_chinchilla(coefficients)
  n = _positive("n_params", n_params)
  d = _positive("n_tokens", n_tokens)
  return c["E"] + c["A"] * n ** -c["alpha"] + c["B"] * d ** -c["beta"]


def compute_optimal(coefficients: dict, compute) -> tuple:
  """`(N_opt, D_opt)` minimising the law's loss at compute C = 6 N D.

  With a = beta / (alpha + beta) and b = alpha / (alpha + beta) (Hoffmann
  et al. 2022, Eq. 4 and App. D.2):

      N_opt = G (C / 6)^a,   D_opt = (C / 6)^b / G,
      G = (alpha A / (beta B))^(1 / (alpha + beta)).

  The overtraining form is the case alpha = beta = -eta, A = alpha,
  B = beta 6^(eta/2): N_opt = G (C / 6)^(1/2), M_opt = D_opt / N_opt =
  G^-2 constant over C (docs/scaling.md).

  Raises:
    ValueError: exponents that are not > 0 (no finite optimum), or a
      compute that is not finite and > 0.
  """
  c = as_chinchilla(coefficients)
  compute = _positive("compute", compute)
  if not (c["alpha"] > 0 and c["beta"] > 0 and c["A"] > 0 and c["B"] > 0):
    raise ValueError(
      "`coefficients` must have A, B > 0 and exponents alpha, beta > 0 "
      f"(eta < 0) for a finite compute-optimal size, got {coefficients}."
    )
  total = c["alpha"] + c["beta"]
  g = (c["alpha"] * c["A"] / (c["beta"] * c["B"])) ** (1 / total)
  n_opt = g * (compute / 6) ** (c["beta"] / total)
  return n_opt, compute / (6 * n_opt)


def fit_error_law(loss, error) -> dict:
  """Fits `Err(L) = epsilon - k exp(-gamma L)` (Gadre et al. 2024, Eq. 5)
  by least squares, as the authors' `curve_fit` (their start, all ones).

  Args:
    loss: `[runs]` losses L > 0.
    error: `[runs]` downstream errors (e.g. top-1 error in [0, 1]).

  Returns:
    `{"epsilon", "k", "gamma"}`.

  Raises:
    ValueError: not 1-D, lengths differ, non-finite values, fewer than 3
      distinct losses, or no convergence.
  """
  loss = _vector("loss", loss)
  error = np.asarray(error, np.float64)
  if error.shape != loss.shape or not np.all(np.isfinite(error)):
    raise ValueError(
      f"`error` must be finite with the shape of `loss` {loss.shape}, got "
      f"{error.shape}."
    )
  if np.unique(loss).size < 3:
    raise ValueError(
      f"`loss` must hold >= 3 distinct values to fit 3 coefficients, got "
      f"{np.unique(loss).size}."
    )

  names = ("epsilon", "k", "gamma")

  def residuals(theta):
    c = dict(zip(names, theta, strict=True))
    return predict_error(c, loss) - error

  result = optimize.least_squares(
    residuals, np.ones(3), method="lm", max_nfev=10_000, xtol=1e-15
  )
  if not (result.success and np.all(np.isfinite(result.x))):
    raise ValueError(f"The error-law fit did not converge: {result.message}")
  return dict(zip(names, result.x.tolist(), strict=True))


def predict_error(coefficients: dict, loss) -> np.ndarray:
  """`epsilon - k exp(-gamma L)` at loss L."""
  c = coefficients
  return c["epsilon"] - c["k"] * np.exp(-c["gamma"] * np.asarray(loss))
