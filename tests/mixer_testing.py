"""Shared helpers for tests of token mixers (one kind or every registered
one)."""

import jax
import jax.numpy as jnp
import numpy as np

from lightning_jax import ops
from lightning_jax.layers import mixers


def kinds() -> tuple[str, ...]:
  """Every registered mixer kind (the built-in ones and any test's)."""
  return mixers.kinds()


def moa_plan(num_layers: int, heads: int) -> ops.MoAPlan:
  """A plan whose heads keep windows of about N / 4 + 2."""
  return ops.MoAPlan(
    alphas=((2.0,) * heads,) * num_layers, betas=((0.25,) * heads,) * num_layers
  )


def overrides(kind: str, num_attention_layers: int, heads: int) -> dict:
  """Model-config fields a kind needs beyond the defaults (MoA's plan)."""
  if kind == "moa":
    return {"moa_plan": moa_plan(num_attention_layers, heads)}
  return {}


def assert_layer_matches_reference(layer_fn, reference_fn, params, x, tol):
  """`sum(sin(f(params, x)))` of the layer and of its reference twin agree,
  value and gradients w.r.t. params and x, within `tol` (assert_allclose
  kwargs). `layer_fn` and `reference_fn`: `(params, x) -> y`."""

  def value_and_grads(f):
    loss = lambda p, x: jnp.sum(jnp.sin(f(p, x)))
    return jax.jit(jax.value_and_grad(loss, (0, 1)))(params, x)

  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, **tol),
    value_and_grads(layer_fn),
    value_and_grads(reference_fn),
  )
