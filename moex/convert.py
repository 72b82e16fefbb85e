"""Checkpoints in and out of moex: Hugging Face model directories <-> moex workdirs.

Import (a Mixtral, Qwen3-MoE, OLMoE, Llama or Mistral directory: its config, safetensors,
tokenizer files):

  python -m moex.convert --from_hf=/models/OLMoE-1B-7B --workdir=/tmp/moex/olmoe

writes WORKDIR/params/ (orbax, sharded per the config's mesh rules, in the checkpoint's
dtype), WORKDIR/tokenizer/, WORKDIR/hf_source.json and, last, the workdir's config (the
resolved moex config: model and moe sections from the directory's config, the rest from
--config, default experiments/tiny.py, with overrides such as --config.data.seq_len=1024).
A workdir without its config is an import that did not finish; running the same command
again redoes it. Fine-tune from it with `train.init_from=WORKDIR`
(experiments/finetune.py).

Export (a workdir's newest readable checkpoint, or its imported params/):

  python -m moex.convert --to_hf=/tmp/olmoe-ft --workdir=/tmp/moex/olmoe_ft

writes a directory that transformers' AutoModelForCausalLM.from_pretrained loads, in the
hub's per-expert layout (architecture: the imported one, else chosen from the config, or
--architecture), with moex_export.json. OUT must be new, empty or an earlier moex export
(--overwrite replaces anything else); the new copy is written as OUT.partial and swapped in
by renames. The flows are moex/interop/convert.py.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from moex import cli
from moex.interop import convert

_DEFAULT_BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "experiments", "tiny.py")


def define_flags():
  """The command's flags (defined only when run as a program); returns the --config holder."""
  flags.DEFINE_string("from_hf", None, "Hugging Face model directory to import.")
  flags.DEFINE_string("to_hf", None, "Directory to export the workdir's model to.")
  flags.DEFINE_string("workdir", None, "The moex workdir (import: new; export: source).")
  config = config_flags.DEFINE_config_file(
      "config", None, "Import: the moex config whose data/opt/train/mesh sections the "
      "imported workdir keeps (model and moe come from the HF config); default "
      "experiments/tiny.py.", lock_config=False)
  flags.DEFINE_string(
      "tokenizer", None, "Import: tokenizer file or directory (default: the model "
      "directory's tokenizer.json / tokenizer.model), or 'byte'.")
  flags.DEFINE_string("architecture", None, "Export: the transformers architecture "
                      "(default: the imported one, else chosen from the config).")
  flags.DEFINE_float("max_shard_gb", 4.0, "Export: largest safetensors file (GB).")
  flags.DEFINE_bool("overwrite", False, "Export: replace --to_hf even when it holds files "
                    "that are not an earlier moex export.")
  return config


def with_default_config(argv: list[str]) -> list[str]:
  """argv with --config=experiments/tiny.py when it names none. A default given to
  DEFINE_config_file is loaded, overrides and all, when the flag is defined, before
  cli.run can turn its errors into one line."""
  if any(a.split("=", 1)[0] in ("--config", "-config") for a in argv[1:]):
    return argv
  return argv[:1] + [f"--config={_DEFAULT_BASE}"] + argv[1:]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.workdir or (f.from_hf is None) == (f.to_hf is None):
    raise convert.ConvertError("give --workdir and exactly one of --from_hf / --to_hf")
  if f.from_hf is not None:
    cfg = convert.import_hf(f.from_hf, f.workdir, f.config, f.tokenizer)
    print(f"moex.convert: imported {f.from_hf} -> {f.workdir} "
          f"({len(cfg.model.moe_layers)} MoE blocks of {cfg.model.num_layers}); fine-tune "
          f"with --config.train.init_from={f.workdir}", flush=True)
  else:
    fam = convert.export_hf(f.workdir, f.to_hf, f.architecture, f.max_shard_gb, f.overwrite)
    print(f"moex.convert: exported {f.workdir} -> {f.to_hf} ({fam.architecture})", flush=True)


if __name__ == "__main__":
  sys.argv = with_default_config(sys.argv)
  cli.run(main, define_flags, program="moex.convert")
