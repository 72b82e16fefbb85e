"""moex/config.py: every bad value fails before compiling, with one line naming the key."""

import subprocess
import sys

import pytest

from experiments import tiny
from moex import config as config_lib
from moex.parallel import mesh as mesh_lib


def _set(cd, key, value):
  section, name = key.split(".")
  with cd.unlocked():
    cd[section][name] = value
  return cd


def test_default_config_validates():
  cfg = config_lib.validate(tiny.get_config(), vocab_size=259)
  assert cfg.model.vocab_size == 259
  assert cfg.model.moe_layers == (0, 1, 2, 3)
  assert cfg.moe.capacity(256, 1.25) == 80  # ceil(1.25 * 256 * 2 / 8)


@pytest.mark.parametrize("key,value,fragment", [
    ("moe.top_k", 10, "moe.top_k: 10 must be <= moe.num_experts=8"),
    ("moe.capacity_factor", 0.0, "moe.capacity_factor: must be > 0"),
    ("moe.capacity_factor", -1.0, "moe.capacity_factor: must be > 0"),
    ("moe.router", "nope", "moe.router: unknown value 'nope'"),
    ("moe.dispatch", "magic", "moe.dispatch: unknown value 'magic'"),
    ("moe.grouped_matmul", "cuda", "moe.grouped_matmul: unknown value 'cuda'"),
    ("model.num_kv_heads", 3, "model.num_kv_heads: 3 does not divide"),
    ("data.val_fraction", 1.5, "data.val_fraction"),
    ("mesh.expert", 0, "mesh.expert"),
    ("train.steps", 0, "train.steps: must be > 0"),
])
def test_bad_values_name_the_key(key, value, fragment):
  with pytest.raises(config_lib.ConfigError, match="^" + fragment.split(":")[0]) as e:
    config_lib.validate(_set(tiny.get_config(), key, value), vocab_size=259)
  assert fragment in str(e.value)
  assert "\n" not in str(e.value)


def test_unknown_key_is_an_error():
  cd = tiny.get_config()
  with cd.unlocked():
    cd.moe.num_expert = 4  # typo
  with pytest.raises(config_lib.ConfigError, match="moe.num_expert: unknown key"):
    config_lib.validate(cd)


def test_mesh_product_must_match_devices():
  cfg = config_lib.validate(_set(tiny.get_config(), "mesh.data", 2), vocab_size=259)
  with pytest.raises(config_lib.ConfigError, match="mesh: data=2 x fsdp=1"):
    mesh_lib.resolve_shape(cfg.mesh, 1)
  assert mesh_lib.resolve_shape(cfg.mesh, 2)["data"] == 2


def _main(tmp_path, *overrides, env=None):
  cmd = [sys.executable, "-m", "moex.main", "--config=experiments/tiny.py",
         f"--workdir={tmp_path / 'w'}", *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                        cwd=str(config_lib.__file__).rsplit("/moex/", 1)[0], env=env)


def test_main_exits_with_one_line_for_bad_value(tmp_path):
  r = _main(tmp_path, "--config.moe.top_k=9")
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last == "moex: config error: moe.top_k: 9 must be <= moe.num_experts=8"


def test_main_exits_with_one_line_for_missing_data(tmp_path):
  r = _main(tmp_path, f"--config.data.source={tmp_path}/nothing/*.txt")
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1].startswith("moex: config error: data.source:")


def test_batch_must_divide_over_devices(tmp_path):
  import os
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3",
             JAX_PLATFORMS="cpu")
  r = _main(tmp_path, env=env)
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1] == (
      "moex: config error: data.batch_size: 16 is not divisible by the 3 batch shards of "
      "the mesh")


def _main8(tmp_path, *overrides):
  import os
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  return _main(tmp_path, *overrides, env=env)


def test_bad_layouts_fail_before_compiling_with_one_line(tmp_path):
  cases = [
      (("--config.mesh.data=3",), "moex: config error: mesh: data=3 x fsdp=1 x expert=1 x "
       "tensor=1 = 3 devices, but 8 are available"),
      (("--config.mesh.data=-1", "--config.mesh.expert=8", "--config.moe.num_experts=12"),
       "moex: config error: moe.num_experts: 12 experts do not divide over the 8 "
       "expert-parallel ranks of the mesh"),
      (("--config.mesh.data=-1", "--config.mesh.expert=8", "--config.data.batch_size=12"),
       "moex: config error: data.batch_size: 12 is not divisible by the 8 batch shards of "
       "the mesh"),
  ]
  for overrides, line in cases:
    r = _main8(tmp_path, *overrides)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == line


def test_main_exits_with_one_line_when_data_is_too_small(tmp_path):
  (tmp_path / "a.py").write_text("x = 1\n")
  (tmp_path / "b.py").write_text("y = 2\n")
  r = _main(tmp_path, f"--config.data.source={tmp_path}/*.py",
            f"--config.data.cache_dir={tmp_path}/cache")
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1].startswith("moex: config error: data.batch_size:")
