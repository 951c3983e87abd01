"""Explicit device meshes, partition rules, sequence parallelism, multi-process.

`make_mesh("data=2,fsdp=2,tensor=2")` builds a mesh over every device of every
process; `param_shardings` / `init_sharded` place parameters by the partition
rules in `sharding.py`; `shard_step` jits a training step over the mesh.
"""

from lightning_jax.parallel.distributed import initialize_distributed
from lightning_jax.parallel.mesh import AXES
from lightning_jax.parallel.mesh import axis_size
from lightning_jax.parallel.mesh import make_mesh
from lightning_jax.parallel.mesh import mesh_axis_sizes
from lightning_jax.parallel.mesh import parse_mesh_spec
from lightning_jax.parallel.pipeline import from_pipeline_params
from lightning_jax.parallel.pipeline import pipeline_grad_fn
from lightning_jax.parallel.pipeline import stack_stages
from lightning_jax.parallel.pipeline import to_pipeline_params
from lightning_jax.parallel.pipeline import unstack_stages
from lightning_jax.parallel.sequence import sequence_parallel
from lightning_jax.parallel.sequence import sp_delta_rule
from lightning_jax.parallel.sequence import sp_gated_linear_attention
from lightning_jax.parallel.sequence import sp_linear_attention
from lightning_jax.parallel.sharding import batch_sharding
from lightning_jax.parallel.sharding import batch_spec
from lightning_jax.parallel.sharding import init_sharded
from lightning_jax.parallel.sharding import LOGICAL_AXES
from lightning_jax.parallel.sharding import match_rule
from lightning_jax.parallel.sharding import PARAM_RULES
from lightning_jax.parallel.sharding import param_rules
from lightning_jax.parallel.sharding import param_partition_specs
from lightning_jax.parallel.sharding import param_shardings
from lightning_jax.parallel.sharding import plan_leaf
from lightning_jax.parallel.sharding import shard_step
from lightning_jax.parallel.sharding import sharding_summary
from lightning_jax.parallel.sharding import traced_on
