"""Device meshes from a text spec such as `"data=2,pipe=2,expert=2"`.

Axis names are a fixed vocabulary (`AXES`); every other module refers to mesh
axes by these names. A mesh spans all devices of all processes
(`jax.devices()`), and every axis is `AxisType.Auto`: training steps are
`jax.jit` with in/out shardings, and the `shard_map` regions inside them name
their manual axes explicitly.
"""

from collections.abc import Sequence

import jax
import numpy as np

from lightning_jax.ops import sequence_parallel

DATA, FSDP, TENSOR, EXPERT, PIPE, SEQ = (
  "data",
  "fsdp",
  "tensor",
  "expert",
  "pipe",
  sequence_parallel.SEQ,
)
AXES = (DATA, FSDP, TENSOR, EXPERT, PIPE, SEQ)


def parse_mesh_spec(spec: str | None) -> dict[str, int]:
  """Parses `"axis=size,..."` into an ordered `{axis: size}` dict.

  Validation only (no devices are touched), so flags can be checked up front.

  Args:
    spec: comma-separated `name=size` pairs, names among `AXES`, sizes >= 1,
      each name at most once. None or "" gives `{}` (all devices on "data",
      see `make_mesh`).

  Returns:
    `{axis: size}` in the order written (the mesh's axis order).

  Raises:
    ValueError: naming `spec` on an unknown / repeated axis or a bad size.

  Example:
    >>> parse_mesh_spec("data=2,pipe=2,expert=2")
    {'data': 2, 'pipe': 2, 'expert': 2}
  """
  if spec is None or not spec.strip():
    return {}
  sizes = {}
  for item in spec.split(","):
    name, sep, size = item.strip().partition("=")
    name = name.strip()
    if not sep or name not in AXES:
      raise ValueError(
        f"`spec` must be comma-separated `axis=size` with axis in "
        f"{list(AXES)}, got item {item!r} in {spec!r}."
      )
    if name in sizes:
      raise ValueError(f"`spec` names axis {name!r} twice: {spec!r}.")
    try:
      value = int(size)
    except ValueError:
      value = 0
    if value < 1 or str(value) != size.strip():
      raise ValueError(
        f"`spec` axis {name!r} must have a positive integer size, got "
        f"{size!r} in {spec!r}."
      )
    sizes[name] = value
  return sizes


def make_mesh(
  spec: str | dict[str, int] | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
  """A `Mesh` over all devices (of all processes) from a spec.

  Axes keep the order of the spec: put the axes that talk most (tensor,
  expert) last so that they land on neighbouring devices.

  Args:
    spec: a `parse_mesh_spec` string or an `{axis: size}` dict; None or ""
      puts every device on one "data" axis.
    devices: the devices to lay out; default `jax.devices()` (global, i.e.
      every process's devices in a multi-process run).

  Returns:
    A `jax.sharding.Mesh` with `AxisType.Auto` axes.

  Raises:
    ValueError: naming `spec` when the product of the sizes is not the number
      of devices (the message lists the devices).

  Example:
    >>> make_mesh("data=2,tensor=4").shape  # with 8 devices
    OrderedDict([('data', 2), ('tensor', 4)])
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = dict(spec) if isinstance(spec, dict) else parse_mesh_spec(spec)
  for name, size in sizes.items():
    if name not in AXES or isinstance(size, bool) or int(size) < 1:
      raise ValueError(
        f"`spec` must map axes in {list(AXES)} to positive sizes, got {sizes}."
      )
  if not sizes:
    sizes = {DATA: len(devices)}
  product = int(np.prod(list(sizes.values())))
  if product != len(devices):
    listing = "\n  ".join(
      f"{d.id}: {d.device_kind} (process {d.process_index})" for d in devices
    )
    raise ValueError(
      f"`spec` {sizes} needs {product} devices, but there are "
      f"{len(devices)}:\n  {listing}"
    )
  return jax.make_mesh(
    tuple(int(s) for s in sizes.values()),
    tuple(sizes),
    axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
    devices=devices,
  )


def mesh_axis_sizes(mesh: jax.sharding.Mesh) -> dict[str, int]:
  """`{axis: size}` of a mesh, in its axis order (`axis_size`: absent ones)."""
  return dict(mesh.shape)


def axis_size(mesh: jax.sharding.Mesh, name: str) -> int:
  """Size of mesh axis `name`, 1 when the mesh has no such axis."""
  return int(mesh.shape.get(name, 1))
