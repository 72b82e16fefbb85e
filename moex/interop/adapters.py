"""The adapter flows behind `python -m moex.adapters`: merge a LoRA run into a plain workdir,
write its adapters in PEFT's format, and read a PEFT adapter onto a base workdir.

- `merge`: WORKDIR (an adapter run) -> OUT, a normal workdir whose params/ hold
  W + scale * A B (each weight in its own dtype), config.json without adapters (lora.rank
  0), the tokenizer files and the import record (hf_source.json) when there is one.
- `to_peft`: WORKDIR -> OUT/adapter_config.json + OUT/adapter_model.safetensors, for the
  transformers model that `python -m moex.convert --to_hf` writes (moex/interop/peft.py).
- `from_peft`: a PEFT directory + BASE (a workdir holding the base model: an import or a
  trained run) -> WORKDIR, whose params/ hold the base and the adapters and whose config is
  BASE's with the lora section the adapter needs; generate, export and evaluate read it
  like any workdir.
Workdirs are written config.json last (Workdir.write_config): one without it is unfinished.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from moex import config as config_lib
from moex import workdir as workdir_lib
from moex.interop import convert, families, hf, peft, safetensors_dir
from moex.model import lora
from moex.parallel import mesh as mesh_lib
from moex.train import init_from, state as state_lib

PEFT_SOURCE = "peft_source.json"  # where a from_peft workdir's adapters came from


def _adapter_run(workdir: str) -> tuple[workdir_lib.Workdir, config_lib.Config]:
  wd = workdir_lib.Workdir(workdir)
  cfg = wd.validated(check_tokenizer=False)
  if not cfg.lora.enabled:
    raise peft.PeftError(f"--workdir={workdir}: has no adapters (lora.rank is 0 in its "
                         f"{workdir_lib.CONFIG})")
  return wd, cfg


def _new_workdir(out: str) -> workdir_lib.Workdir:
  wd = workdir_lib.Workdir(out)
  if wd.has_config():
    raise peft.PeftError(f"{out}: already holds a model; pick a new directory")
  return wd.make()


def _copy_tokenizer(src: workdir_lib.Workdir, dst: workdir_lib.Workdir,
                    raw: dict) -> None:
  tok = convert.tokenizer_dir(src)
  if tok is not None:
    target = dst.path / workdir_lib.TOKENIZER
    if target.exists():
      target.rmtree()
    hf.copy_files(hf.tokenizer_files(str(tok)), target)
    raw["data"]["tokenizer"] = str(target)


def merge(workdir: str, out: str) -> int:
  """WORKDIR's adapters merged into its base weights, written as workdir OUT; returns the
  number of adapter parameters folded in."""
  wd, cfg = _adapter_run(workdir)
  dst = _new_workdir(out)
  params, buffers = convert.load_on_one_device(wd, cfg)
  n = lora.count(params)
  init_from.save_params(str(dst.path), lora.merged(params, cfg.lora), buffers)
  raw = wd.raw_config()
  raw["lora"] = dataclasses.asdict(config_lib.LoRAConfig())
  _copy_tokenizer(wd, dst, raw)
  source = convert.hf_source(wd)
  if source:
    (dst.path / workdir_lib.HF_SOURCE).write_text(json.dumps(source, indent=2))
  dst.write_config(raw)
  return n


def _family(wd: workdir_lib.Workdir, cfg: config_lib.Config,
            architecture: str | None) -> families.Family:
  source = convert.hf_source(wd)
  fam, _ = families.from_moex(cfg.model, cfg.moe, architecture or source.get("architecture"))
  return fam


def to_peft(workdir: str, out: str, architecture: str | None = None,
            overwrite: bool = False) -> tuple[families.Family, dict]:
  """WORKDIR's adapters -> PEFT directory OUT (written as OUT.partial, then swapped in)."""
  wd, cfg = _adapter_run(workdir)
  fam = _family(wd, cfg, architecture)
  target = epath.Path(out)
  safetensors_dir.check_target(target, overwrite=overwrite, flag="--to_peft",
                               keep=(wd.path,))
  params, _ = convert.load_on_one_device(wd, cfg)
  adapters = jax.device_get(lora.split(params, lora.is_adapter)[0])
  source = convert.hf_source(wd)
  config, tensors = peft.to_peft(adapters, cfg, fam, source.get("directory"))
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  tmp = safetensors_dir.sibling(target, ".partial")
  if tmp.exists():
    tmp.rmtree()
  tmp.mkdir(parents=True)
  (tmp / peft.WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
  (tmp / peft.CONFIG).write_text(json.dumps(config, indent=2))
  safetensors_dir.write_marker(tmp, {"workdir": str(wd.path), "adapters": True})
  safetensors_dir.replace_dir(tmp, target)
  return fam, config


def from_peft(peft_dir: str, base: str, workdir: str,
              architecture: str | None = None) -> config_lib.Config:
  """A PEFT adapter on BASE's model -> a new workdir WORKDIR (see the module docstring)."""
  src = workdir_lib.Workdir(base)
  cfg = src.validated(check_tokenizer=False)
  if cfg.lora.enabled:
    raise peft.PeftError(f"--base={base}: already has adapters; merge them first "
                         "(--merge_to) and read the PEFT adapter onto the merged workdir")
  fam = _family(src, cfg, architecture)
  d = epath.Path(peft_dir)
  adapter_cfg, tensors = peft.read(d)
  tree, targets, rank = peft.from_peft(adapter_cfg, tensors, cfg, fam, str(d / peft.WEIGHTS))
  dst = _new_workdir(workdir)
  raw = src.raw_config()
  raw["lora"] = dict(dataclasses.asdict(config_lib.LoRAConfig()), rank=rank,
                     alpha=float(rank), targets=targets)
  new_cfg = workdir_lib.validate(ml_collections.ConfigDict(raw), src.tokenizer_spec(),
                                 check_tokenizer=False)
  params, buffers = convert.load_on_one_device(src, cfg)
  # The adapters' shapes must be the model's: the same check a checkpoint read makes.
  _, abs_params, _ = _abstract(new_cfg)
  flat = lambda t: {p: a.shape for p, a in ocp.tree.to_flat_dict(t).items()}
  want = flat(lora.split(abs_params, lora.is_adapter)[0])
  got = flat(tree)
  for p in sorted(set(want) | set(got)):
    if want.get(p) != got.get(p):
      raise peft.PeftError(f"{d / peft.WEIGHTS}: adapter {'/'.join(p)} is "
                           f"{got.get(p)} but --base={base}'s model makes it {want.get(p)}")
  dtype = np.dtype(new_cfg.lora.dtype)
  params = lora.join(params, jax.tree.map(lambda x: x.astype(dtype), tree))
  init_from.save_params(str(dst.path), params, buffers)
  _copy_tokenizer(src, dst, raw)
  source = convert.hf_source(src)
  if source:
    (dst.path / workdir_lib.HF_SOURCE).write_text(json.dumps(source, indent=2))
  (dst.path / PEFT_SOURCE).write_text(json.dumps(
      {"directory": str(d), "config": adapter_cfg, "base": str(src.path)}, indent=2))
  dst.write_config(raw)
  return new_cfg


def _abstract(cfg: config_lib.Config):
  one = dataclasses.replace(cfg.mesh, data=1, fsdp=1, expert=1, tensor=1)
  mesh = mesh_lib.make_mesh(one, devices=jax.devices()[:1])
  return state_lib.abstract_variables(dataclasses.replace(cfg, mesh=one), mesh)
