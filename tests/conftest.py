"""Test configuration: 8 fake CPU devices, strict numerics, deterministic
hypothesis."""

import atexit
import os
import shutil
import tempfile

# Must run before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Test shapes are tiny: compile time dominates, and LLVM's -O0 compiles
# about 1.5x faster with identical numerics.
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
)

# One persistent compilation cache per test session, which the tools the
# tests launch inherit: a program that several tests (or a tool's
# subprocess) compile again after `_free_compiled_programs` or in a fresh
# process loads the first compilation's executable instead. The key covers
# the HLO, the compile options and the devices, so a hit runs the same
# program. The session starts it empty (a CI run compiles everything once).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="lightning_jax_tests_cache_")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import hypothesis  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update(
  "jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"]
)
jax.config.update(
  "jax_persistent_cache_min_compile_time_secs",
  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
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
