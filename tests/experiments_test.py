"""experiments/*.py: every config validates and documents its command."""

import importlib
import pathlib

import pytest

from moex import config as config_lib
from moex.train import flops

EXPERIMENTS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "experiments")
                     .glob("*.py") if p.stem != "__init__")
VARIANTS = {"bench_cpu": [None, "dropless"],
            "mixtral_gpu": [None, "dropless", "dropless_chunked"]}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_validates_and_names_its_command(name):
  module = importlib.import_module(f"experiments.{name}")
  assert "python -m moex." in module.__doc__
  for arg in VARIANTS.get(name, [None]):
    cfg = config_lib.validate(module.get_config(arg), vocab_size=259)
    assert flops.train_flops_per_token(cfg) > 0


def test_mixtral_gpu_has_mixtral_layer_widths():
  from experiments import mixtral_gpu
  cfg = config_lib.validate(mixtral_gpu.get_config(), vocab_size=259)
  active = flops.active_params_per_token(cfg)
  per_layer_experts = active["routed_experts"] / cfg.model.num_layers
  assert per_layer_experts == 2 * 3 * 4096 * 14336  # two of Mixtral's experts per token
