"""moex/generate.py: greedy generation equals transformers' generate(do_sample=False), the
command works on a trained and on an imported workdir, sampling is reproducible, EOS stops
only its own sequence, each shape compiles once, expert-parallel decoding gives the
1-device tokens, and bad input gets one line.
"""

import dataclasses
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from moe_reference import JIT_OPTIONS
import multidevice_run

from experiments import tiny
from moex import config as config_lib, generate, sample
from moex.data import tokenizer as tokenizer_lib
from moex.interop import hf
from moex.model.decoder import Decoder
from moex.parallel import mesh as mesh_lib
from moex.train import loop, state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = JIT_OPTIONS.get("compiler_options")
NEW = 12
HF_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, initializer_range=0.15, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, max_position_embeddings=256, rope_theta=5000.0)
HF_FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                       intermediate_size=40, head_dim=12, norm_topk_prob=True,
                       mlp_only_layers=[1])),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(intermediate_size=40)),
}


def _hub(name: str, directory: pathlib.Path, vocab_size: int = 96) -> pathlib.Path:
  cls_cfg, cls_model, extra = HF_FAMILIES[name]
  torch.manual_seed(0)
  cls_model(cls_cfg(vocab_size=vocab_size, **HF_COMMON, **extra)).float().save_pretrained(
      directory)
  return directory


def _hf_greedy(directory, prompt, eos_id=None):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, experts_implementation="eager",
      attn_implementation="eager").eval()
  model.generation_config.eos_token_id = eos_id
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt], dtype=torch.int64),
                         attention_mask=torch.ones((1, len(prompt)), dtype=torch.int64),
                         do_sample=False, max_new_tokens=NEW, eos_token_id=eos_id,
                         pad_token_id=0)
  tokens = out[0, len(prompt):].tolist()
  return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens


def _imported_generator(directory, batch_size, **kwargs):
  fam, _, model, moe = hf.moex_sections(str(directory))
  cd = tiny.get_config()
  cd.model.update(model)
  cd.moe.update(moe)
  cfg = config_lib.validate(cd)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, abs_params, abs_buffers = state_lib.abstract_variables(cfg, mesh)
  params = hf.load_params(str(directory), cfg, abs_params, fam)
  return generate.Generator(cfg, graphdef, params, jax.tree.map(np.zeros_like, abs_buffers),
                            mesh, batch_size=batch_size, cache_len=48, compiler_options=FAST,
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


def _run(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                        text=True, timeout=300, env=env, cwd=str(ROOT))


@pytest.mark.slow
def test_command_on_an_imported_mixtral_prints_transformers_greedy_text(tmp_path, bpe_dir):
  tok = tokenizer_lib.get_tokenizer(str(bpe_dir))
  hub = _hub("mixtral", tmp_path / "hub", vocab_size=tok.vocab_size)
  shutil.copy(bpe_dir / "tokenizer.json", hub / "tokenizer.json")
  workdir = tmp_path / "imported"
  r = _run("moex.convert", f"--from_hf={hub}", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-2000:]
  text = "def parse(x):\n    return"
  r = _run("moex.generate", f"--workdir={workdir}", f"--prompt={text}",
           f"--max_new_tokens={NEW}")
  assert r.returncode == 0, r.stderr[-2000:]
  want = tok.decode(np.asarray(_hf_greedy(hub, tok.encode(text).tolist(), tok.eos_id)))
  assert f"--- prompt 0\n{text}{want.decode('utf-8', errors='replace')}\n" in r.stdout
  last = r.stdout.strip().splitlines()[-1]
  assert "prefill" in last and "decode" in last and "tokens/s" in last, last


def test_command_on_a_trained_workdir(many_experts_workdir):
  """The session's trained tiny run (E=256, K=8: decode steps take the gather path)."""
  out = io.StringIO()
  texts, timing = generate.run(many_experts_workdir, ["def f(x):", "x = 1"], max_new_tokens=6,
                               sampling=sample.Sampling(temperature=0.8, top_k=20), seed=1,
                               batch_size=1, stream=True, out=out)
  assert len(texts) == 2 and timing.prefill_tokens == 2 * 1 + len("def f(x):x = 1")  # + BOS
  assert timing.decode_tokens > 0 and timing.compile_s > 0
  printed = out.getvalue()
  assert printed.startswith("--- prompt 0\ndef f(x):" + texts[0] + "\n--- prompt 1\nx = 1")
  assert "prefill" in printed.splitlines()[-1] and "decode" in printed.splitlines()[-1]


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
  return generate.Generator(*small, compiler_options=FAST, **kwargs)


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
  with pytest.raises(generate.GenerateError) as e:
    _gen(small, cache_len=cache).generate(prompts, new)
  assert fragment in str(e.value) and "\n" not in str(e.value)


def test_refusals_name_the_reason(small, tmp_path):
  cfg, graphdef, params, buffers, mesh = small
  ec = dataclasses.replace(cfg, moe=dataclasses.replace(
      cfg.moe, router="expert_choice", allow_noncausal_routing=True))
  with pytest.raises(generate.GenerateError, match="expert_choice: cannot generate: .*"
                     "non-causal"):
    generate.Generator(ec, graphdef, params, buffers, mesh, batch_size=1, cache_len=8)
  with pytest.raises(generate.GenerateError, match="^--workdir=.*: no checkpoint"):
    (tmp_path / "config.json").write_text(json.dumps(tiny.get_config().to_dict()))
    generate.load(str(tmp_path))
  with pytest.raises(generate.GenerateError, match="config.json: missing"):
    generate.load(str(tmp_path / "nothing"))
  with pytest.raises(generate.GenerateError, match="^--mesh=expert: expected"):
    generate.parse_mesh("expert", cfg.mesh)
  with pytest.raises(generate.GenerateError, match="^--prompts_file=.*: holds no prompt"):
    (tmp_path / "p.txt").write_text("\n  \n")
    generate.read_prompts([], str(tmp_path / "p.txt"))
  with pytest.raises(generate.GenerateError, match="^prompt 1 is empty"):
    generate.read_prompts(["a", ""], None)


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
