"""The conversion flows behind `python -m moex.convert`: a Hugging Face directory -> a new moex
workdir (`import_hf`), and a workdir's model -> a transformers directory (`export_hf`).

Import writes WORKDIR/params/, WORKDIR/tokenizer/, WORKDIR/hf_source.json and, last,
WORKDIR/config.json: a workdir without config.json is an import that did not finish, and the
same command run again redoes it. A workdir with LoRA adapters exports its merged model
(W + scale * A B); `python -m moex.adapters` writes the adapters alone (PEFT's format). Export writes OUT.partial/ and swaps it in for OUT
(safetensors_dir.replace_dir); OUT must be new, empty or an earlier export (moex_export.json)
unless `overwrite`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import ml_collections
from absl import logging
from etils import epath

from moex import config as config_lib
from moex import errors
from moex import workdir as workdir_lib
from moex.data import tokenizer as tokenizer_lib
from moex.interop import families, hf, safetensors_dir
from moex.model import lora
from moex.parallel import mesh as mesh_lib
from moex.train import init_from, loop, state as state_lib


class ConvertError(ValueError, errors.Refusal):
  """A one-line reason the conversion cannot proceed."""


def _directory(flag: str, value: str) -> None:
  """Refuses (one line) a path given for a directory that is something else."""
  p = epath.Path(value)
  if p.exists() and not p.is_dir():
    raise ConvertError(f"{flag}={value}: is a file, not a directory")


def import_hf(hf_dir: str, workdir: str, base: ml_collections.ConfigDict,
              tokenizer: str | None = None) -> config_lib.Config:
  """Hugging Face directory -> moex workdir (see the module docstring); returns the config."""
  _directory("--from_hf", hf_dir)
  fam, hf_config, model, moe = hf.moex_sections(hf_dir)
  wd = workdir_lib.Workdir(workdir)
  if wd.has_config():
    raise ConvertError(f"--workdir={workdir}: already holds a model; pick a new directory")
  tok_files = (hf.tokenizer_files(hf_dir) if tokenizer is None else
               [] if tokenizer == "byte" else _tokenizer_files(tokenizer))
  if tokenizer != "byte" and not any(f.name in hf.VOCAB_FILES for f in tok_files):
    where = hf_dir if tokenizer is None else f"--tokenizer={tokenizer}"
    raise ConvertError(f"{where}: no {' or '.join(hf.VOCAB_FILES)}; pass --tokenizer=PATH "
                       "(or --tokenizer=byte)")
  wd.make()
  if (wd.path / workdir_lib.PARAMS).exists():
    logging.warning("import: %s has params/ but no %s: an unfinished import; redoing it",
                    workdir, workdir_lib.CONFIG)
  tok_dir = wd.path / workdir_lib.TOKENIZER
  if tok_dir.exists():  # an unfinished import's copy: this run's files replace it
    tok_dir.rmtree()
  cd = base.copy_and_resolve_references()
  with cd.unlocked():
    cd.model.update(model)
    cd.moe.update(moe)
    if tok_files:
      hf.copy_files(tok_files, tok_dir)
      cd.data.tokenizer = str(tok_dir)
    else:
      cd.data.tokenizer = "byte"
  cfg, mesh = loop.config_and_mesh(cd)  # the trainer's own checks: tokenizer, config, mesh layout
  _, abs_params, abs_buffers = state_lib.abstract_variables(cfg, mesh)
  if jax.tree.leaves(abs_buffers):  # none of the families keeps router state
    raise ConvertError(f"{fam.architecture}: the moex model has buffers the checkpoint lacks")
  logging.info("import: %s from %s (%s)", fam.architecture, hf_dir, cfg.model.param_dtype)
  params = hf.load_params(hf_dir, cfg, abs_params, fam)
  init_from.save_params(workdir, params, abs_buffers)  # replaces an unfinished import's
  del params
  (wd.path / workdir_lib.HF_SOURCE).write_text(json.dumps(
      {"architecture": fam.architecture, "directory": str(hf_dir), "config": hf_config},
      indent=2))
  wd.write_config(cd)  # last: now the workdir holds a model
  return cfg


def _tokenizer_files(path: str) -> list[epath.Path]:
  p = epath.Path(os.path.expanduser(path))
  if p.is_dir():
    files = hf.tokenizer_files(str(p))
  elif p.exists():
    files = [p] + [f for f in hf.tokenizer_files(str(p.parent)) if f.name != p.name and
                   f.suffix == ".json" and f.name not in hf.VOCAB_FILES]
  else:
    files = []
  if not files:
    raise ConvertError(f"--tokenizer={path}: no such tokenizer file or directory")
  return files


def export_hf(workdir: str, out_dir: str, architecture: str | None = None,
              max_shard_gb: float = 4.0, overwrite: bool = False) -> families.Family:
  """A moex workdir's model -> a transformers directory (see the module docstring)."""
  if not math.isfinite(max_shard_gb) or max_shard_gb <= 0:
    raise ConvertError(f"--max_shard_gb={max_shard_gb}: must be a finite number > 0")
  _directory("--workdir", workdir)
  _directory("--to_hf", out_dir)
  wd = workdir_lib.Workdir(workdir)
  cfg = wd.validated(check_tokenizer=False)
  out = epath.Path(out_dir)
  # Refused before any weight is read; hf.export checks again right before writing.
  safetensors_dir.check_target(out, overwrite=overwrite, keep=(wd.path, epath.Path(os.getcwd())))
  params, buffers = load_on_one_device(wd, cfg)
  del buffers
  if cfg.lora.enabled:  # what the adapter run computes: W + scale * A B
    params = lora.merged(params, cfg.lora)
    cfg = dataclasses.replace(cfg, lora=config_lib.LoRAConfig())
  source = hf_source(wd)
  tok_dir = tokenizer_dir(wd)
  extra = dict(source.get("config") or {})
  if tok_dir is not None and not source:  # a moex-trained model: special ids from its tokenizer
    tok = tokenizer_lib.get_tokenizer(str(tok_dir))
    extra.update({f"{k}_token_id": i for k, i in (("bos", tok.bos_id), ("eos", tok.eos_id),
                                                   ("pad", tok.pad_id)) if i >= 0})

  def fetch(path):
    x = params
    for k in path:
      x = x[k]
    return jax.device_get(x)

  return hf.export(fetch, cfg, out_dir, architecture=architecture or source.get("architecture"),
                   extra_config=extra, max_shard_bytes=int(max_shard_gb * (1 << 30)),
                   tokenizer_dir=None if tok_dir is None else str(tok_dir), overwrite=overwrite,
                   marker={"workdir": str(wd.path)})


def load_on_one_device(wd: workdir_lib.Workdir, cfg: config_lib.Config) -> tuple[dict, dict]:
  """(params, buffers) of the workdir (params/ or its newest readable checkpoint, adapters
  included) on one host device: export and merge stream them out one by one."""
  one = dataclasses.replace(cfg.mesh, data=1, fsdp=1, expert=1, tensor=1)
  mesh = mesh_lib.make_mesh(one, devices=jax.devices()[:1])
  _, abs_params, abs_buffers = state_lib.abstract_variables(
      dataclasses.replace(cfg, mesh=one), mesh)
  return init_from.load_params(str(wd.path), abs_params, abs_buffers,
                               who=f"--workdir={wd.path}")


def tokenizer_dir(wd: workdir_lib.Workdir) -> epath.Path | None:
  """The directory of the workdir's tokenizer files (its one rule), if it has one."""
  spec = wd.tokenizer_spec()
  if spec == "byte":
    return None
  p = epath.Path(spec)
  return p if p.is_dir() and hf.tokenizer_files(str(p)) else None


def hf_source(wd: workdir_lib.Workdir, hops: int = 8) -> dict:
  """hf_source.json of the workdir, else of the workdir its train.init_from names (a fine-tune
  of an import exports as the imported architecture), following up to `hops` links."""
  for _ in range(hops):
    path = wd.path / workdir_lib.HF_SOURCE
    if path.exists():
      return json.loads(path.read_text())
    try:
      source = wd.raw_config()["train"].get("init_from", "")
    except (workdir_lib.WorkdirError, KeyError, TypeError, AttributeError):
      return {}
    if not source:
      return {}
    wd = workdir_lib.Workdir(source)
  return {}
