"""tools/profile_step.py: a training step's time charged to source functions."""

from lightning_jax import models
from tools import profile_step


def test_charges_the_step_to_the_recurrence_kernel_and_layers():
  cfg = models.get_preset(
    "deltanet", num_layers=1, d_model=16, num_heads=2, head_dim=8, d_ff=32
  )
  cost, rows = profile_step.profile(cfg, batch=1, seq=16)
  assert cost["flops"] > 0
  functions = {r["function"] for r in rows}
  assert "lightning_jax/ops/delta_rule.py:_chunked" in functions
  assert "lightning_jax/layers/recurrent.py:short_conv" in functions
  assert abs(sum(r["pct"] for r in rows) - 100) < 1e-6
  assert all(r["ms"] >= 0 for r in rows)
