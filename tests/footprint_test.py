"""moex/footprint.py, the command: its output, and every refusal as one line (exit 2)."""

import pathlib
import subprocess
import sys

import pytest
from absl import flags

from moex.train import footprint as footprint_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _command(*args):
  return subprocess.run([sys.executable, "-m", "moex.footprint",
                         "--config=experiments/mixtral_8x7b.py", *args],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_importing_the_command_defines_none_of_its_flags():
  import moex.footprint  # pylint: disable=import-outside-toplevel
  assert not {"devices", "device_memory_gb"} & set(flags.FLAGS)
  assert callable(moex.footprint.define_flags)  # cli.run defines them when run as a program


@pytest.mark.slow
def test_the_command_prints_the_counts_and_bytes():
  r = _command("--devices=64", "--device_memory_gb=95")
  assert r.returncode == 0, r.stderr[-2000:]
  from experiments import mixtral_8x7b  # pylint: disable=import-outside-toplevel
  expected = footprint_lib.describe(mixtral_8x7b.get_config(), "experiments/mixtral_8x7b.py",
                                    64, 95.0)
  out = r.stdout.splitlines()
  assert r.stdout.strip() == expected
  assert out[0] == ("experiments/mixtral_8x7b.py on 64 devices, mesh data=1 fsdp=8 expert=8 "
                    "tensor=1")
  assert out[1].startswith("parameters: 46.70B total, 12.88B active per token")
  assert out[-1].startswith("fits in 95 GiB per device")


@pytest.mark.parametrize("args,line", [
    (["--config.moe.num_expert=4", "--devices=64"],
     "moex.footprint: config error: --config.moe.num_expert: experiments/mixtral_8x7b.py has "
     "no key moe.num_expert; did you mean moe.num_experts?"),
    (["--devices=12"], "moex.footprint: mesh.fsdp: -1 cannot fill 12 devices when the other "
                       "axes multiply to 8"),
    ([], "moex.footprint: --devices: needed to resolve mesh.fsdp=-1"),
    (["--devices=64", "--device_memory_gb=nan"],
     "moex.footprint: --device_memory_gb=nan: must be a finite number of GiB above 0"),
])
@pytest.mark.slow
def test_a_bad_key_mesh_or_memory_is_one_line(args, line):
  r = _command(*args)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == line
