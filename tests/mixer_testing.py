"""Shared helpers for tests that iterate over every registered token mixer."""

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
