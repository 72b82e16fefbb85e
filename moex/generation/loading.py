"""A workdir's model for generation: config, tokenizer, mesh and weights, placed.

Only reads the workdir (moex/workdir.py): its tokenizer by the one rule (WORKDIR/tokenizer/
when present, else data.tokenizer), its weights from params/ or the newest checkpoint that
reads back (a newer unreadable one is passed over with one warning and left in place).
"""

from __future__ import annotations

import dataclasses

from moex import config as config_lib, workdir as workdir_lib
from moex.generation.engine import GenerateError, refuse_noncausal
from moex.parallel import mesh as mesh_lib, sharding
from moex.train import checkpoint, init_from, state as state_lib


def parse_mesh(text: str, mesh_cfg: config_lib.MeshConfig) -> config_lib.MeshConfig:
  """--mesh=a=n,b=m over the workdir's mesh config (unnamed axes 1)."""
  if not text:
    return mesh_cfg
  sizes = dict.fromkeys(config_lib.MESH_AXES, 1)
  for part in text.split(","):
    name, _, value = part.partition("=")
    if name.strip() not in sizes or not value.strip().lstrip("-").isdigit():
      raise GenerateError(f"--mesh={text}: expected axis=size pairs over "
                          f"{', '.join(config_lib.MESH_AXES)}")
    sizes[name.strip()] = int(value)
  return dataclasses.replace(mesh_cfg, **sizes)


def load(workdir: str, mesh_text: str = ""):
  """(cfg, tokenizer, mesh, graphdef, params, buffers) of a workdir's imported parameters or
  newest readable checkpoint, placed on the mesh; GenerateError (one line) otherwise."""
  try:
    return _load(workdir_lib.Workdir(workdir), mesh_text)
  except (workdir_lib.WorkdirError, config_lib.ConfigError, checkpoint.CheckpointError) as e:
    raise GenerateError(str(e)) from None


def _load(wd: workdir_lib.Workdir, mesh_text: str):
  cfg = wd.validated()
  tok = wd.tokenizer()
  cfg = dataclasses.replace(cfg, mesh=parse_mesh(mesh_text, cfg.mesh))
  refuse_noncausal(cfg)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  ranks = sharding.split_size("expert", cfg.mesh.rules, mesh)
  if cfg.moe.num_experts % ranks:
    raise GenerateError(f"--mesh: {cfg.moe.num_experts} experts do not divide over its "
                        f"{ranks} expert-parallel ranks")
  graphdef, abs_params, abs_buffers = state_lib.abstract_variables(cfg, mesh)
  who = f"--workdir={wd.given}"
  none = (f"{who}: no checkpoint ({workdir_lib.CHECKPOINTS}/N/) and no imported "
          f"{workdir_lib.PARAMS}/ to generate from; train it (python -m moex.main) or import "
          "a model (python -m moex.convert --from_hf)")
  params, buffers = init_from.load_params(str(wd.given), abs_params, abs_buffers, who=who,
                                          none=none)
  return cfg, tok, mesh, graphdef, params, buffers
