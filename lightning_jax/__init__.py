"""lightning_jax: pure-JAX functions for efficient sequence models.

Rooms (see ARCHITECTURE): `ops` (array -> array kernels), `moe`, `layers`,
`models`, `parallel`, `training`, `inference`, `diffusion`.
"""

__version__ = "0.1.0"
