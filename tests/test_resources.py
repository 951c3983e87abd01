"""The test process's own resources stay bounded over the whole suite.

Runs after every module but `tests/training/` (collection order), so it sees
what the earlier modules left behind.
"""

import pathlib

import pytest

_MAPS = pathlib.Path("/proc/self/maps")
_MAX_MAPS = pathlib.Path("/proc/sys/vm/max_map_count")


def _num_maps() -> int:
  return len(_MAPS.read_text().splitlines())


@pytest.mark.skipif(not _MAX_MAPS.exists(), reason="needs Linux's /proc")
def test_compiled_programs_do_not_pile_up_memory_maps():
  # XLA:CPU executables hold memory mappings until freed; without the
  # conftest's per-module `jax.clear_caches()` the suite passed
  # vm.max_map_count and XLA segfaulted while compiling.
  limit = int(_MAX_MAPS.read_text())
  assert _num_maps() < limit // 4, (_num_maps(), limit)
