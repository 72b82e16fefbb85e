"""Checkpoints in and out of moex: Hugging Face model directories <-> moex workdirs.

Import (a Mixtral, Qwen3-MoE, OLMoE, Llama or Mistral directory: config.json, safetensors,
tokenizer files):

  python -m moex.convert --from_hf=/models/OLMoE-1B-7B --workdir=/tmp/moex/olmoe

writes WORKDIR/config.json (the resolved moex config: model and moe sections from
config.json, the rest from --config, default experiments/tiny.py, with overrides such as
--config.data.seq_len=1024), WORKDIR/params/ (orbax, sharded per the config's mesh rules, in
the checkpoint's dtype), WORKDIR/tokenizer/ and WORKDIR/hf_source.json. config.json is
written last: a workdir without it is an import that did not finish. Fine-tune from it with
`train.init_from=WORKDIR` (experiments/finetune.py).

Export (a workdir's newest checkpoint, or its imported params/):

  python -m moex.convert --to_hf=/tmp/olmoe-ft --workdir=/tmp/moex/olmoe_ft

writes a directory that transformers' AutoModelForCausalLM.from_pretrained loads, in the
hub's per-expert layout (architecture: the imported one, else chosen from the config, or
--architecture).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from moex import errors
from moex import config as config_lib
from moex.data import tokenizer as tokenizer_lib
from moex.interop import hf
from moex.parallel import mesh as mesh_lib
from moex import workdir as workdir_lib
from moex.train import checkpoint, init_from, loop, state as state_lib

_DEFAULT_BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "experiments", "tiny.py")
SOURCE = "hf_source.json"

class ConvertError(ValueError, errors.Refusal):
  """A one-line reason the conversion cannot proceed."""


def import_hf(hf_dir: str, workdir: str, base: ml_collections.ConfigDict,
              tokenizer: str | None = None) -> config_lib.Config:
  """Hugging Face directory -> moex workdir (see the module docstring); returns the config."""
  fam, hf_config, model, moe = hf.moex_sections(hf_dir)
  out = workdir_lib.path(workdir)
  if (out / "config.json").exists() or (out / init_from.PARAMS).exists():
    raise ConvertError(f"--workdir={workdir}: already holds a model; pick a new directory")
  workdir_lib.make(workdir)
  tok_files = (hf.tokenizer_files(hf_dir) if tokenizer is None else
               [] if tokenizer == "byte" else _tokenizer_files(tokenizer))
  if tokenizer is None and not tok_files:
    raise ConvertError(f"{hf_dir}: no tokenizer.json or tokenizer.model; pass "
                       "--tokenizer=PATH (or --tokenizer=byte)")
  cd = base.copy_and_resolve_references()
  with cd.unlocked():
    cd.model.update(model)
    cd.moe.update(moe)
    if tok_files:
      hf.copy_files(tok_files, out / "tokenizer")
      cd.data.tokenizer = str(out / "tokenizer")
    else:
      cd.data.tokenizer = "byte"
  cfg, mesh = loop.prepare(cd)  # the trainer's own checks: tokenizer, config, mesh layout
  _, abs_params, abs_buffers = state_lib.abstract_variables(cfg, mesh)
  if jax.tree.leaves(abs_buffers):  # none of the families keeps router state
    raise ConvertError(f"{fam.architecture}: the moex model has buffers the checkpoint lacks")
  logging.info("import: %s from %s (%s)", fam.architecture, hf_dir, cfg.model.param_dtype)
  params = hf.load_params(hf_dir, cfg, abs_params, fam)
  init_from.save_params(workdir, params, abs_buffers)
  del params
  (out / SOURCE).write_text(json.dumps({"architecture": fam.architecture,
                                        "directory": str(hf_dir), "config": hf_config},
                                       indent=2))
  resolved = cd.to_dict()
  (out / "config.json").write_text(json.dumps(resolved, indent=2, default=str))
  return cfg


def _tokenizer_files(path: str) -> list[epath.Path]:
  p = epath.Path(os.path.expanduser(path))
  if p.is_dir():
    files = hf.tokenizer_files(str(p))
  elif p.exists():
    files = [p] + [f for f in hf.tokenizer_files(str(p.parent)) if f.name != p.name and
                   f.suffix == ".json" and f.name != "tokenizer.json"]
  else:
    files = []
  if not files:
    raise ConvertError(f"--tokenizer={path}: no such tokenizer file or directory")
  return files


def read_workdir_config(workdir: str) -> tuple[ml_collections.ConfigDict, config_lib.Config]:
  """A workdir's config.json as a ConfigDict and its validated view."""
  path = workdir_lib.path(workdir) / "config.json"
  if not path.exists():
    raise ConvertError(f"{path}: missing (not a moex workdir, or an import that did not "
                       "finish)")
  try:
    cd = ml_collections.ConfigDict(json.loads(path.read_text()))
  except ValueError as e:
    raise ConvertError(f"{path}: not JSON ({e})") from None
  return cd, config_lib.validate(cd)


def export_hf(workdir: str, out_dir: str, architecture: str | None = None,
              max_shard_bytes: int = 4 << 30):
  """A moex workdir's model -> a transformers directory (see the module docstring)."""
  _, cfg = read_workdir_config(workdir)
  # One host device holds the parameters (the export streams them out one by one).
  one = dataclasses.replace(cfg.mesh, data=1, fsdp=1, expert=1, tensor=1)
  mesh = mesh_lib.make_mesh(one, devices=jax.devices()[:1])
  _, abs_params, abs_buffers = state_lib.abstract_variables(
      dataclasses.replace(cfg, mesh=one), mesh)
  params, _ = init_from.load_params(workdir, abs_params, abs_buffers)
  source = _hf_source(workdir)
  tok_dir = workdir_lib.path(workdir) / "tokenizer"
  extra = dict(source.get("config") or {})
  if tok_dir.exists() and not source:  # a moex-trained model: special ids from its tokenizer
    tok = tokenizer_lib.get_tokenizer(str(tok_dir))
    extra.update({f"{k}_token_id": i for k, i in (("bos", tok.bos_id), ("eos", tok.eos_id),
                                                   ("pad", tok.pad_id)) if i >= 0})

  def fetch(path):
    x = params
    for k in path:
      x = x[k]
    return jax.device_get(x)

  return hf.export(fetch, cfg, out_dir, architecture=architecture or source.get("architecture"),
                   extra_config=extra, max_shard_bytes=max_shard_bytes,
                   tokenizer_dir=str(tok_dir) if tok_dir.exists() else None)


def _hf_source(workdir: str, hops: int = 8) -> dict:
  """hf_source.json of the workdir, else of the workdir its train.init_from names (a fine-tune
  of an import exports as the imported architecture), following up to `hops` links."""
  for _ in range(hops):
    path = workdir_lib.path(workdir) / SOURCE
    if path.exists():
      return json.loads(path.read_text())
    try:
      workdir = json.loads((workdir_lib.path(workdir) / "config.json").read_text())[
          "train"].get("init_from", "")
    except (OSError, ValueError, KeyError, TypeError):
      return {}
    if not workdir:
      return {}
  return {}


def _define_flags() -> None:
  """The command's flags; defined only when run as a program, so importing moex.convert next
  to moex.main (tests, notebooks) defines no duplicate --workdir."""
  flags.DEFINE_string("from_hf", None, "Hugging Face model directory to import.")
  flags.DEFINE_string("to_hf", None, "Directory to export the workdir's model to.")
  flags.DEFINE_string("workdir", None, "The moex workdir (import: new; export: source).")
  config_flags.DEFINE_config_file(
      "config", _DEFAULT_BASE, "Import: the moex config whose data/opt/train/mesh sections "
      "the imported workdir keeps (model and moe come from config.json).", lock_config=False)
  flags.DEFINE_string(
      "tokenizer", None, "Import: tokenizer file or directory (default: the model "
      "directory's tokenizer.json / tokenizer.model), or 'byte'.")
  flags.DEFINE_string("architecture", None, "Export: the transformers architecture "
                      "(default: the imported one, else chosen from the config).")
  flags.DEFINE_float("max_shard_gb", 4.0, "Export: largest safetensors file.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.workdir or (f.from_hf is None) == (f.to_hf is None):
    sys.exit("moex.convert: give --workdir and exactly one of --from_hf / --to_hf")
  try:
    if f.from_hf is not None:
      cfg = import_hf(f.from_hf, f.workdir, f.config, f.tokenizer)
      print(f"moex.convert: imported {f.from_hf} -> {f.workdir} "
            f"({len(cfg.model.moe_layers)} MoE blocks of {cfg.model.num_layers}); fine-tune "
            f"with --config.train.init_from={f.workdir}", flush=True)
    else:
      fam = export_hf(f.workdir, f.to_hf, f.architecture, int(f.max_shard_gb * (1 << 30)))
      print(f"moex.convert: exported {f.workdir} -> {f.to_hf} ({fam.architecture})",
            flush=True)
  except (ConvertError, hf.FormatError, hf.Unsupported, config_lib.ConfigError,
          workdir_lib.WorkdirError, checkpoint.CheckpointError) as e:
    sys.exit(f"moex.convert: {e}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
