"""The device mesh from config: axes data, fsdp, expert, tensor (one may be -1 = the rest)."""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

from moex.config import MESH_AXES, ConfigError, MeshConfig


def resolve_shape(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Axis sizes with -1 filled in; ConfigError if they do not multiply to num_devices."""
  sizes = dict(mesh_cfg.shape)
  known = math.prod(s for s in sizes.values() if s != -1)
  for axis, s in sizes.items():
    if s == -1:
      if num_devices % known:
        raise ConfigError(f"mesh.{axis}: -1 cannot fill {num_devices} devices when the other "
                          f"axes multiply to {known}")
      sizes[axis] = num_devices // known
  product = math.prod(sizes.values())
  if product != num_devices:
    shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
    raise ConfigError(f"mesh: {shape} = {product} devices, but {num_devices} are available")
  return sizes


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with Auto axes, so jit propagates shardings."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_shape(mesh_cfg, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
