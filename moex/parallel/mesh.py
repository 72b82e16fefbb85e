"""The device mesh from config: axes data, fsdp, expert, tensor (one may be -1 = the rest).

Also the checks that need the mesh's sizes (what divides over which split), so a bad layout
fails before compiling with one line naming the key.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh

from moex.config import MESH_AXES, Config, ConfigError, MeshConfig
from moex.parallel import sharding


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


def check_layout(cfg: Config, mesh: Mesh | AbstractMesh, process_count: int | None = None
                 ) -> None:
  """ConfigError unless experts, widths and batches divide over their splits of `mesh`.

  `process_count` defaults to jax.process_count(): each process loads its rows of the batch.
  """
  rules = cfg.mesh.rules
  ranks = sharding.split_size("expert", rules, mesh)
  if cfg.moe.num_experts % ranks:
    raise ConfigError(
        f"moe.num_experts: {cfg.moe.num_experts} experts do not divide over the {ranks} "
        "expert-parallel ranks of the mesh")
  tensor = sharding.split_size("expert_mlp", rules, mesh)
  if cfg.moe.d_expert % tensor:
    raise ConfigError(
        f"moe.d_expert: {cfg.moe.d_expert} does not divide over the {tensor}-way split of "
        "each expert's hidden width (mesh.rules expert_mlp)")
  batch, accum = cfg.data.batch_size, cfg.train.grad_accum_steps
  shards = sharding.batch_shards(rules, mesh)
  if batch % shards:
    raise ConfigError(
        f"data.batch_size: {batch} is not divisible by the {shards} batch shards of the mesh")
  if (batch // accum) % shards:
    raise ConfigError(
        f"train.grad_accum_steps: micro-batches of {batch} / {accum} sequences do not "
        f"divide over the {shards} batch shards of the mesh")
  processes = jax.process_count() if process_count is None else process_count
  if batch % processes:
    raise ConfigError(f"data.batch_size: {batch} is not divisible by {processes} processes")
