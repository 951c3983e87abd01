"""MoA (Fu et al., 2024, arXiv 2406.14909): profile a model's attention
heads, search per-head elastic rules under a density budget, and plan a
model. The sparse kernel, the rule and the plan format are in `ops`
(`ops.moa_attention`, `ops.moa_windows`, `ops.MoAPlan`)."""

from lightning_jax.moa import search
from lightning_jax.moa.influence import attention_influence
from lightning_jax.moa.plan import plan_loss_increase
from lightning_jax.moa.plan import PlanSearch
from lightning_jax.moa.plan import search_plan
from lightning_jax.moa.plan import with_plan
from lightning_jax.moa.profile import loss_probed
from lightning_jax.moa.profile import next_token_loss
from lightning_jax.moa.profile import profile_model
