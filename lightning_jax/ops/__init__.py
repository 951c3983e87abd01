"""Array -> array kernels with no parameters.

Layout `[batch, seq, heads, dim]`; recurrent state `[batch, heads, key_dim,
value_dim]`; fp32 accumulation; outputs in the input dtype. Every op takes
`impl=` and every impl stays public.
"""

from lightning_jax.ops.delta_rule import delta_rule
from lightning_jax.ops.delta_rule import unit_lower_inverse
from lightning_jax.ops.linear_attention import gated_linear_attention
from lightning_jax.ops.linear_attention import linear_attention
from lightning_jax.ops.linear_attention import tnl_log_decay

__all__ = (
    "delta_rule",
    "gated_linear_attention",
    "linear_attention",
    "tnl_log_decay",
    "unit_lower_inverse",
)
