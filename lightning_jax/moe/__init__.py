"""Mixture-of-experts routing math, knowing nothing of parameters.

Routers (`route`, `update_router_bias`, `router_z_loss`), the load-balancing
loss at sequence / micro-batch / exact global-batch scope and its
microbatch pieces, load statistics, GLU experts, dropless and capacity-based
dispatch, and the expert-parallel `all_to_all` exchange. See docs/moe.md.
"""

from lightning_jax.moe.balance import load_balancing_loss
from lightning_jax.moe.balance import load_balancing_loss_from_pieces
from lightning_jax.moe.balance import load_balancing_pieces
from lightning_jax.moe.balance import load_stats
from lightning_jax.moe.balance import LBLPieces
from lightning_jax.moe.balance import LoadStats
from lightning_jax.moe.balance import SCOPES
from lightning_jax.moe.dispatch import capacity_moe
from lightning_jax.moe.dispatch import capacity_slots
from lightning_jax.moe.dispatch import DROP_POLICIES
from lightning_jax.moe.dispatch import dropless_moe
from lightning_jax.moe.dispatch import expert_capacity
from lightning_jax.moe.experts import ACTIVATIONS
from lightning_jax.moe.experts import batched_glu
from lightning_jax.moe.experts import glu
from lightning_jax.moe.experts import GLUWeights
from lightning_jax.moe.experts import grouped_glu
from lightning_jax.moe.routing import route
from lightning_jax.moe.routing import router_z_loss
from lightning_jax.moe.routing import Routing
from lightning_jax.moe.routing import SCORES
from lightning_jax.moe.routing import update_router_bias
