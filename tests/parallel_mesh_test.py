"""moex/parallel/mesh.py: the mesh's shape, and the layout checks that need it."""

import dataclasses
import os
import subprocess
import sys

import pytest
from jax.sharding import AbstractMesh

from experiments import tiny
from moex import config as config_lib
from moex.parallel import mesh as mesh_lib


def _cfg(**overrides) -> config_lib.Config:
  """The tiny config with `section__key=value` overrides, validated."""
  cd = tiny.get_config()
  for key, value in overrides.items():
    section, name = key.split("__")
    cd[section][name] = value
  return config_lib.validate(cd, vocab_size=259)


def _mesh(**sizes) -> AbstractMesh:
  """A mesh shape without devices: the layout checks read only axis sizes."""
  return AbstractMesh(tuple(sizes.get(a, 1) for a in config_lib.MESH_AXES),
                      config_lib.MESH_AXES)


def test_mesh_product_must_match_devices():
  cfg = _cfg(mesh__data=2)
  with pytest.raises(config_lib.ConfigError, match="mesh: data=2 x fsdp=1"):
    mesh_lib.resolve_shape(cfg.mesh, 1)
  assert mesh_lib.resolve_shape(cfg.mesh, 2)["data"] == 2


def test_tiny_layout_is_accepted():
  mesh_lib.check_layout(_cfg(), _mesh(data=2, expert=4, tensor=2), process_count=2)


@pytest.mark.parametrize("overrides,sizes,process_count,line", [
    (dict(moe__num_experts=12), dict(expert=8), 1,
     "moe.num_experts: 12 experts do not divide over the 8 expert-parallel ranks of the mesh"),
    (dict(moe__d_expert=100), dict(tensor=8), 1,
     "moe.d_expert: 100 does not divide over the 8-way split of each expert's hidden width "
     "(mesh.rules expert_mlp)"),
    (dict(data__batch_size=12), dict(expert=8), 1,
     "data.batch_size: 12 is not divisible by the 8 batch shards of the mesh"),
    (dict(train__grad_accum_steps=4), dict(data=8), 1,
     "train.grad_accum_steps: micro-batches of 16 / 4 sequences do not divide over the 8 "
     "batch shards of the mesh"),
    (dict(), dict(), 3, "data.batch_size: 16 is not divisible by 3 processes"),
])
def test_bad_layout_is_one_line_naming_the_key(overrides, sizes, process_count, line):
  with pytest.raises(config_lib.ConfigError) as e:
    mesh_lib.check_layout(_cfg(**overrides), _mesh(**sizes), process_count=process_count)
  assert str(e.value) == line


def test_layout_reads_the_rules_not_the_axis_names():
  cfg = _cfg(moe__num_experts=12)
  rules = tuple(r for r in cfg.mesh.rules if r[0] != "expert") + (("expert", None),)
  cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, rules=rules))
  mesh_lib.check_layout(cfg, _mesh(expert=8))  # experts replicated: nothing to divide


def _main(tmp_path, *overrides, devices: int):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "moex.main", "--config=experiments/tiny.py",
         f"--workdir={tmp_path / 'w'}", *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                        cwd=str(config_lib.__file__).rsplit("/moex/", 1)[0], env=env)


@pytest.mark.slow
def test_batch_must_divide_over_devices(tmp_path):
  r = _main(tmp_path, devices=3)
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1] == (
      "moex: config error: data.batch_size: 16 is not divisible by the 3 batch shards of "
      "the mesh")


@pytest.mark.slow
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
    r = _main(tmp_path, *overrides, devices=8)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == line
