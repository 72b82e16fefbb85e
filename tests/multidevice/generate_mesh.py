"""Greedy generation on 1 device and on expert-parallel meshes of 8 simulated devices.

Prints one JSON line per mesh: whether its tokens equal the 1-device ones (batch 8), the
largest relative difference of its generated positions' logits from a 1-device full forward
pass, the MoE path a decode step takes there, and the expert weights' shard shape. Run by
tests/generation_engine_test.py with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import tiny
from moex import config as config_lib
from moex.generation import engine, loading
from moex.model.decoder import Decoder
from moex.moe import dispatch
from moex.parallel import mesh as mesh_lib
from moex.train import state as state_lib

nnx.use_eager_sharding(False)
# XLA:CPU compiles 3-5x faster without LLVM optimization (tests/moe_reference.py JIT_OPTIONS).
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}

NEW = 8
LENGTHS = (3, 10, 5, 7, 4, 9, 6, 8)
# (mesh, batch): T*K = 8 < E = 16 on expert=4 (the gather path's expert-parallel form);
# 16 on data=2 x expert=4 (the dropless exchange).
MESHES = (("expert=4", 4), ("data=2,expert=4", 8))


def _cfg(mesh_text: str = "") -> config_lib.Config:
  cd = tiny.get_config()
  cd.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, d_ff=48, init_std=0.3)
  cd.moe.update(num_experts=16, top_k=2, d_expert=16)
  cfg = config_lib.validate(cd)
  return dataclasses.replace(cfg, mesh=loading.parse_mesh(mesh_text, cfg.mesh))


def _generator(cfg, host_params, devices, batch):
  mesh = mesh_lib.make_mesh(cfg.mesh, devices=devices)
  graphdef, abs_params, _ = state_lib.abstract_variables(cfg, mesh)
  params = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), host_params, abs_params)
  gen = engine.Generator(cfg, graphdef, params, {}, mesh, batch_size=batch, cache_len=32,
                           compiler_options=FAST)
  return gen, params


def main():
  cfg = _cfg()
  net = Decoder(cfg.model, cfg.moe, nnx.Rngs(0))
  graphdef, state = nnx.split(net, nnx.Param)
  host_params = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 64, n).astype(np.int32) for n in LENGTHS]
  # The reference: one full forward over all sequences, right-padded (causal: the padding
  # reaches no real position).
  full = jax.jit(lambda t: net(t, train=False)[0], compiler_options=FAST)
  ref_tokens = None
  gen, _ = _generator(cfg, host_params, jax.devices()[:1], 8)
  one = [s.tokens for s in gen.generate(prompts, NEW)]
  for mesh_text, batch in MESHES:
    mcfg = _cfg(mesh_text)
    gen, params = _generator(mcfg, host_params, jax.devices()[:8 if batch == 8 else 4], batch)
    seqs = gen.generate(prompts, NEW, keep_logits=True)
    if ref_tokens is None:
      ref_tokens = np.zeros((len(prompts), max(LENGTHS) + NEW - 1), np.int32)
      for i, (p, s) in enumerate(zip(prompts, seqs)):
        ref_tokens[i, :len(p) + NEW - 1] = np.concatenate([p, s.tokens[:-1]])
      ref_logits = np.asarray(full(jnp.asarray(ref_tokens)))
    worst = 0.0
    for i, (p, s) in enumerate(zip(prompts, seqs)):
      want = ref_logits[i, len(p) - 1:len(p) - 1 + NEW]
      got = np.stack(s.logits)
      worst = max(worst, float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
    gate = params["block_0"]["ffn"]["experts"]["gate_ExDxF"]
    print(json.dumps({
        "mesh": mesh_text, "batch": batch,
        "tokens_equal": [s.tokens for s in seqs] == one,
        "max_rel_logit_diff": worst,
        "decode_path": dispatch.plan(mcfg.moe, False, 1, batch).path,
        "expert_shard": list(gate.addressable_shards[0].data.shape),
        "compilations": gen.compilations,
    }), flush=True)


if __name__ == "__main__":
  sys.exit(main())
