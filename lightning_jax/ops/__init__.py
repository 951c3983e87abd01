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
from lightning_jax.ops.moa import MoAPlan
from lightning_jax.ops.moa import moa_attention
from lightning_jax.ops.moa import moa_density
from lightning_jax.ops.moa import moa_mask
from lightning_jax.ops.moa import moa_windows
