"""Array -> array kernels with no parameters.

Layout `[batch, seq, heads, dim]`; recurrent state `[batch, heads, key_dim,
value_dim]`; fp32 accumulation; outputs in the input dtype. Every op takes
`impl=` and every impl stays public.
"""

from lightning_jax.ops import attention as attention_lib
from lightning_jax.ops import moa as moa_lib
from lightning_jax.ops.attention import attention
from lightning_jax.ops.attention import attention_weights
from lightning_jax.ops.attention import causal_mask
from lightning_jax.ops.attention import masked_attention
from lightning_jax.ops._recurrence import cotangent_like
from lightning_jax.ops._recurrence import drop_unit_axes
from lightning_jax.ops.delta_rule import delta_rule
from lightning_jax.ops.delta_rule import unit_lower_inverse
from lightning_jax.ops.linear_attention import gated_linear_attention
from lightning_jax.ops.linear_attention import linear_attention
from lightning_jax.ops.linear_attention import tnl_log_decay
from lightning_jax.ops.moa import MoAPlan
from lightning_jax.ops.moa import moa_attention
from lightning_jax.ops.moa import moa_density
from lightning_jax.ops.moa import moa_mask
from lightning_jax.ops.moa import moa_windows
from lightning_jax.ops.sequence_parallel import map_sequence
from lightning_jax.ops.sequence_parallel import previous_tokens
from lightning_jax.ops.sequence_parallel import SEQUENCE_PARALLEL
from lightning_jax.ops.sequence_parallel import sequence_axis
from lightning_jax.ops.sequence_parallel import sp_delta_rule
from lightning_jax.ops.sequence_parallel import sp_gated_linear_attention
from lightning_jax.ops.sequence_parallel import sp_linear_attention

__all__ = (
  "MoAPlan",
  "SEQUENCE_PARALLEL",
  "attention",
  "attention_lib",
  "attention_weights",
  "causal_mask",
  "delta_rule",
  "gated_linear_attention",
  "linear_attention",
  "map_sequence",
  "masked_attention",
  "moa_attention",
  "moa_density",
  "moa_lib",
  "moa_mask",
  "moa_windows",
  "previous_tokens",
  "sequence_axis",
  "sp_delta_rule",
  "sp_gated_linear_attention",
  "sp_linear_attention",
  "tnl_log_decay",
  "unit_lower_inverse",
)
