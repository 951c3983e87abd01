"""lightning_jax: pure-JAX functions for efficient sequence models.

Rooms: `ops` (array -> array kernels), `moe`, `layers` (the token-mixer
registry, `layers.mixers`), `models`, `parallel`, `training`, `inference`,
`moa`, `diffusion`. docs/architecture.md draws the room graph, says where
each kind of change goes and states the mixer contract.
"""

__version__ = "0.1.0"
