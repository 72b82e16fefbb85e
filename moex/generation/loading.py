"""A workdir's model for generation: config, tokenizer, mesh and weights, placed."""

from __future__ import annotations

import dataclasses
import json

import ml_collections

from moex import config as config_lib
from moex.data import tokenizer as tokenizer_lib
from moex.generation.engine import GenerateError, refuse_noncausal
from moex.parallel import mesh as mesh_lib, sharding
from moex.train import checkpoint, init_from, state as state_lib
from moex.train import workdir as workdir_lib


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json (GenerateError, one line, when it is missing or not JSON)."""
  path = workdir_lib.path(workdir) / "config.json"
  if not path.exists():
    raise GenerateError(f"{path}: missing (not a moex workdir, or an import that did not "
                        "finish)")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except ValueError as e:
    raise GenerateError(f"{path}: not JSON ({e})") from None


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
  """(cfg, tokenizer, mesh, graphdef, params, buffers) of a workdir's newest checkpoint or
  imported parameters, placed on the mesh."""
  cd = read_config(workdir)
  try:
    tok = tokenizer_lib.get_tokenizer(cd.data.tokenizer)
  except ValueError as e:
    raise GenerateError(str(e)) from None
  cfg = config_lib.validate(cd, vocab_size=tok.vocab_size)
  cfg = dataclasses.replace(cfg, mesh=parse_mesh(mesh_text, cfg.mesh))
  refuse_noncausal(cfg)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  ranks = sharding.split_size("expert", cfg.mesh.rules, mesh)
  if cfg.moe.num_experts % ranks:
    raise GenerateError(f"--mesh: {cfg.moe.num_experts} experts do not divide over its "
                        f"{ranks} expert-parallel ranks")
  _check_has_weights(workdir)
  graphdef, abs_params, abs_buffers = state_lib.abstract_variables(cfg, mesh)
  try:
    params, buffers = init_from.load_params(workdir, abs_params, abs_buffers)
  except (config_lib.ConfigError, checkpoint.CheckpointError) as e:
    raise GenerateError(str(e).replace("train.init_from: ", f"--workdir={workdir}: ", 1)
                        ) from None
  return cfg, tok, mesh, graphdef, params, buffers


def _check_has_weights(workdir: str) -> None:
  """GenerateError unless the workdir holds params/ (an import) or a checkpoint."""
  root = workdir_lib.path(workdir)
  if (root / init_from.PARAMS).exists():
    return
  ckpts = root / "checkpoints"
  if ckpts.exists() and any((d / "state").exists() for d in ckpts.iterdir()
                            if d.name.isdigit()):
    return
  raise GenerateError(f"--workdir={workdir}: no checkpoint (checkpoints/N/) and no imported "
                      f"{init_from.PARAMS}/ to generate from; train it (python -m moex.main) "
                      "or import a model (python -m moex.convert --from_hf)")
