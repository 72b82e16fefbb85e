"""Will it fit? python -m moex.footprint: what each device holds to train a config on a mesh.

  python -m moex.footprint --config=experiments/mixtral_8x7b.py --devices=64 \\
      [--config.mesh.expert=8 ...] [--device_memory_gb=95]

Prints total and active parameters, then per device: parameters, gradients, optimizer state,
an activation estimate, their sum and, with --device_memory_gb (GiB), whether it fits. It
allocates nothing and needs no device (moex/train/footprint.py says what is exact and what
is estimated). Every refusal (a bad flag, config key, mesh or memory size) is one line
`moex.footprint: ...` on stderr, exit status 2; the command writes nothing.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from moex import cli
from moex.train import footprint


def define_flags() -> flags.FlagHolder:
  """Flags only when run as a program (moex.main defines --config too)."""
  holder = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                           lock_config=True)
  flags.DEFINE_integer("devices", None, "Devices of the mesh (resolves a -1 mesh axis); "
                       "default: the product of the mesh axes.")
  flags.DEFINE_float("device_memory_gb", None, "Memory of one device in GiB (2^30 bytes); "
                     "prints whether the total fits.")
  flags.mark_flags_as_required(["config"])
  return holder


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  name = config_flags.get_config_filename(f["config"])
  print(footprint.describe(f.config, name, f.devices, f.device_memory_gb), flush=True)


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.footprint")
