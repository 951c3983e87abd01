"""Test configuration: 8 fake CPU devices, strict numerics, deterministic
hypothesis."""

import os

# Must run before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Test shapes are tiny: compile time dominates, and LLVM's -O0 compiles
# about 1.5x faster with identical numerics.
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
)

import jax  # noqa: E402
import hypothesis  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

hypothesis.settings.register_profile(
  "ci",
  derandomize=True,
  database=None,
  deadline=None,
  max_examples=12,
  print_blob=True,
  suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.register_profile(
  "dev",
  deadline=None,
  max_examples=50,
  suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops JAX's compiled programs after each test module.

  Every XLA:CPU executable keeps memory mappings (about 200 per test here),
  and the suite's few thousand compilations passed Linux's default
  `vm.max_map_count` (65530) around test 237: XLA then segfaulted inside
  `backend_compile_and_load`. No test reuses another module's programs.
  """
  yield
  jax.clear_caches()
