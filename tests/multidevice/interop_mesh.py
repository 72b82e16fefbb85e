"""Imports one Hugging Face checkpoint onto 1 device and onto an (data=2, expert=4) mesh of
8 simulated devices; prints JSON: expert shard shapes and the largest logit difference.

Run by tests/interop_hf_test.py with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import json
import sys
import tempfile

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from experiments import tiny
from moex import config as config_lib
from moex.interop import hf
from moex.parallel import mesh as mesh_lib, sharding
from moex.train import state as state_lib


def _logits(d, tokens, mesh_sizes):
  fam, _, model, moe = hf.moex_sections(d)
  cd = tiny.get_config()
  cd.model.update(model)
  cd.moe.update(moe)
  cd.mesh.update(mesh_sizes)
  cfg = config_lib.validate(cd)
  devices = jax.devices()[:int(np.prod(list(mesh_sizes.values())))]
  mesh = mesh_lib.make_mesh(cfg.mesh, devices=devices)
  graphdef, abs_params, abs_buffers = state_lib.abstract_variables(cfg, mesh)
  params = hf.load_params(d, cfg, abs_params, fam)
  gate = params["block_0"]["ffn"]["experts"]["gate_ExDxF"]
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    def run(p, t):
      return nnx.merge(graphdef, p, {})(t, train=False)[0]
    logits = jax.jit(run)(params, tokens)
  return np.asarray(logits), [list(s.data.shape) for s in gate.addressable_shards]


def main():
  torch.manual_seed(0)
  c = transformers.MixtralConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=24, num_local_experts=8,
                                 num_experts_per_tok=2, initializer_range=0.15)
  d = tempfile.mkdtemp()
  transformers.MixtralForCausalLM(c).save_pretrained(d)
  tokens = np.random.default_rng(0).integers(0, 96, (8, 128))
  one, _ = _logits(d, tokens, dict(data=1, fsdp=1, expert=1, tensor=1))
  many, shards = _logits(d, tokens, dict(data=2, fsdp=1, expert=4, tensor=1))
  print(json.dumps({"max_diff": float(np.max(np.abs(one - many))), "shards": shards}))


if __name__ == "__main__":
  sys.exit(main())
