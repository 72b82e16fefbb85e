"""LoRA adapters out of and into moex: python -m moex.adapters.

  python -m moex.adapters --workdir=workdirs/lora_run --merge_to=workdirs/merged
  python -m moex.adapters --workdir=workdirs/lora_run --to_peft=/tmp/peft_adapter
  python -m moex.adapters --from_peft=/tmp/peft_adapter --base=workdirs/mixtral \
      --workdir=workdirs/with_adapter

--merge_to writes a normal workdir (params/ = W + scale * A B, no adapters) that trains,
generates and exports like any; --to_peft writes adapter_config.json and
adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads onto the transformers
model `python -m moex.convert --to_hf` writes (architecture: the imported one, else chosen
from the config, or --architecture); --from_peft reads a PEFT LoRA adapter onto a base
workdir's model into a new workdir. The flows are moex/interop/adapters.py, the formats
moex/interop/peft.py. Refusals are one line naming the flag, file or key (exit status 2):
a workdir without adapters, routers trained in full (PEFT cannot carry them), a target the
Hugging Face family has no tensor for, a PEFT file with an unknown key or a shape that does
not fit the base model.
"""

from __future__ import annotations

from absl import app, flags

from moex import cli
from moex.interop import adapters


def define_flags():
  flags.DEFINE_string("workdir", None, "--merge_to / --to_peft: the adapter run; "
                      "--from_peft: the new workdir.")
  flags.DEFINE_string("merge_to", None, "A new workdir for the merged model.")
  flags.DEFINE_string("to_peft", None, "A directory for the adapters in PEFT's format.")
  flags.DEFINE_string("from_peft", None, "A PEFT LoRA adapter directory to read.")
  flags.DEFINE_string("base", None, "--from_peft: the workdir holding the base model.")
  flags.DEFINE_string("architecture", None, "The transformers architecture of the model the "
                      "adapter belongs to (default: the imported one, else from the config).")
  flags.DEFINE_bool("overwrite", False, "--to_peft: replace a directory that holds other "
                    "files.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  chosen = [n for n in ("merge_to", "to_peft", "from_peft") if f[n].value is not None]
  if len(chosen) != 1 or not f.workdir:
    raise adapters.peft.PeftError("give --workdir and exactly one of --merge_to, --to_peft, "
                                  "--from_peft")
  if f.from_peft is not None:
    if not f.base:
      raise adapters.peft.PeftError("--from_peft needs --base=WORKDIR (the base model)")
    cfg = adapters.from_peft(f.from_peft, f.base, f.workdir, f.architecture)
    print(f"moex.adapters: {f.from_peft} on {f.base} -> {f.workdir} (rank {cfg.lora.rank}, "
          f"targets {cfg.lora.targets})", flush=True)
  elif f.merge_to is not None:
    n = adapters.merge(f.workdir, f.merge_to)
    print(f"moex.adapters: merged {n} adapter parameters of {f.workdir} -> {f.merge_to}",
          flush=True)
  else:
    fam, config = adapters.to_peft(f.workdir, f.to_peft, f.architecture, f.overwrite)
    print(f"moex.adapters: {f.workdir} -> {f.to_peft} (PEFT LoRA for {fam.architecture}, "
          f"r={config['r']})", flush=True)


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.adapters")
