"""moex/generation/engine.py: greedy generation equals transformers' generate(do_sample=False),
sampling is reproducible, EOS stops only its own sequence, each shape compiles once,
expert-parallel decoding gives the 1-device tokens, and bad prompts get one line.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from generation_reference import NEW, _hf_greedy, _hub
from moe_reference import JIT_OPTIONS
import interop_tiny
import multidevice_run

from experiments import tiny
from moex import config as config_lib
from moex.generation import engine, sampling as sample
from moex.model.decoder import Decoder
from moex.parallel import mesh as mesh_lib
from moex.train import state as state_lib

FAST = JIT_OPTIONS.get("compiler_options")


def _imported_generator(directory, batch_size, **kwargs):
  cfg, mesh, graphdef, params, buffers = interop_tiny.load_imported(directory)
  return engine.Generator(cfg, graphdef, params, buffers, mesh, batch_size=batch_size, cache_len=48, compiler_options=FAST,
                            **kwargs)


def _prompts(lengths=(4, 11, 7), vocab=96, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, vocab, n).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("name", ["qwen3_moe", "llama"])
def test_greedy_equals_transformers_generate(name, tmp_path):
  """A batch of prompts of different lengths (left-padded) against transformers, one prompt
  at a time; Qwen3-MoE: E=8, K=2 and 3 prompts decode on the gather path (T*K < E)."""
  d = _hub(name, tmp_path / name)
  prompts = _prompts()
  gen = _imported_generator(d, batch_size=3)
  got = [s.tokens for s in gen.generate(prompts, NEW)]
  for p, tokens in zip(prompts, got):
    assert len(tokens) == NEW
    assert tokens == _hf_greedy(d, p.tolist()), name


@pytest.fixture(scope="module")
def small():
  """A tiny random MoE (E=8, K=2) built in-process: (cfg, graphdef, params, buffers, mesh)."""
  cd = tiny.get_config()
  cd.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, d_ff=48, init_std=0.3)
  cd.moe.update(num_experts=8, top_k=2, d_expert=16)
  cfg = config_lib.validate(cd)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, _, _ = state_lib.abstract_variables(cfg, mesh)

  def init():
    _, params, buffers = nnx.split(Decoder(cfg.model, cfg.moe, nnx.Rngs(3)), nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)

  params, buffers = jax.jit(init, **JIT_OPTIONS)()  # eager init compiles op by op: slower
  return cfg, graphdef, params, buffers, mesh


def _gen(small, **kwargs):
  kwargs.setdefault("batch_size", 3)
  kwargs.setdefault("cache_len", 40)
  return engine.Generator(*small, compiler_options=FAST, **kwargs)


def test_sampling_is_reproducible_and_seeded(small):
  prompts = _prompts((3, 6, 2, 5), vocab=64)
  s = sample.Sampling(temperature=1.0, top_p=0.9)
  a = [x.tokens for x in _gen(small, sampling=s, seed=7).generate(prompts, 10)]
  b = [x.tokens for x in _gen(small, sampling=s, seed=7, batch_size=1).generate(prompts, 10)]
  c = [x.tokens for x in _gen(small, sampling=s, seed=8).generate(prompts, 10)]
  assert a == b  # same seed: same tokens, batch of 3 (+ a filler row) or 1 at a time
  assert a != c
  greedy = [x.tokens for x in _gen(small).generate(prompts, 10)]
  assert a != greedy


def test_eos_stops_only_its_own_sequence_and_shapes_compile_once(small):
  prompts = _prompts((3, 6, 2), vocab=64, seed=4)
  gen = _gen(small)
  free = [x.tokens for x in gen.generate(prompts, 10)]
  # An EOS id that sequence 0 emits at step 2 and sequence 1 never emits.
  eos = next(t for t in free[0][2:] if t not in free[1] and t not in free[0][:2])
  stop = free[0].index(eos)
  out = gen.generate(prompts, 10, eos_id=eos)
  assert out[0].tokens == free[0][:stop] and out[0].stopped_by_eos
  assert out[1].tokens == free[1] and not out[1].stopped_by_eos
  if eos in free[2]:
    assert out[2].tokens == free[2][:free[2].index(eos)]
  # Three generate calls, prompts of widths 3..6 (one bucket): one prefill and one step.
  gen.generate(_prompts((5, 1), vocab=64), 4)
  assert gen.compilations == 2
  assert gen.timing.decode_tokens > 0 and gen.timing.prefill_tokens > 0


def test_streaming_calls_back_every_token_in_order(small):
  seen = []
  out = _gen(small, batch_size=1).generate(_prompts((4,), vocab=64), 5,
                                           on_token=lambda i, t: seen.append((i, t)))
  assert seen == [(0, t) for t in out[0].tokens]


@pytest.mark.parametrize("lengths,new,cache,fragment", [
    ((3, 40), 4, 40, "prompt 1 has 40 tokens, longer than the cache (--cache_len=40"),
    ((3, 30), 12, 40, "prompt 1 has 30 tokens: with --max_new_tokens=12 it needs 42 cache"),
    ((3, 0), 4, 40, "prompt 1 is empty"),
    ((3,), 0, 40, "--max_new_tokens: must be >= 1"),
])
def test_bad_prompts_get_one_line(small, lengths, new, cache, fragment):
  prompts = [np.ones(n, np.int32) for n in lengths]
  with pytest.raises(engine.GenerateError) as e:
    _gen(small, cache_len=cache).generate(prompts, new)
  assert fragment in str(e.value) and "\n" not in str(e.value)


def test_expert_choice_is_refused_as_noncausal(small):
  cfg, graphdef, params, buffers, mesh = small
  ec = dataclasses.replace(cfg, moe=dataclasses.replace(
      cfg.moe, router="expert_choice", allow_noncausal_routing=True))
  with pytest.raises(engine.GenerateError, match="expert_choice: cannot generate: .*"
                     "non-causal"):
    engine.Generator(ec, graphdef, params, buffers, mesh, batch_size=1, cache_len=8)


@pytest.mark.slow
def test_expert_parallel_decoding_gives_the_one_device_tokens():
  """tests/multidevice/generate_mesh.py on 8 simulated devices: expert=4 (batch 4: T*K = 8
  < E = 16, the gather path across ranks) and data=2 x expert=4 (batch 8, dropless)."""
  _, rows = multidevice_run.run("generate_mesh.py", timeout=600)
  assert [row["decode_path"] for row in rows] == ["gather", "dropless"], rows
  for row in rows:
    assert row["tokens_equal"], row
    assert row["max_rel_logit_diff"] <= 1e-5, row
    assert row["expert_shard"][0] == 4, row  # 16 experts over 4 expert ranks
    assert row["compilations"] == 2, row
