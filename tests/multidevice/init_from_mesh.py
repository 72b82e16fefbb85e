"""Run with 4 simulated CPU devices (tests/train_init_from_test.py does): a run with
train.init_from=SOURCE on a (fsdp=2, expert=2) mesh, one step; prints one JSON line with its
step-0 evaluation and the mesh it ran on.

  python tests/multidevice/init_from_mesh.py CORPUS_GLOB CACHE_DIR SOURCE WORKDIR
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, ".."))

import jax  # noqa: E402
from conftest import _tiny  # noqa: E402

from moex.train import loop  # noqa: E402


def main(corpus: str, cache_dir: str, source: str, workdir: str) -> None:
  assert jax.device_count() == 4, jax.devices()
  c = _tiny(corpus, cache_dir)
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, 2, 2
  c.train.init_from = source
  result = loop.train_and_evaluate(c, workdir, max_steps=1)
  print(json.dumps({"first_eval": result["first_eval"], "step": result["step"],
                    "devices": jax.device_count()}), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:5])
