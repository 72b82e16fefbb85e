"""moex/adapters.py and moex/interop/adapters.py: an adapter run fine-tunes a base workdir
(step 0 is the base model exactly; 20 + 20 steps resumed equal 40; the base weights never
change), merges into a plain workdir with the same logits, and goes out to PEFT's format
and back onto the base. Refusals are one line."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moex import workdir as workdir_lib
from moex.interop import adapters, convert, peft
from moex.model import lora
from moex.parallel import mesh as mesh_lib
from moex.train import loop, state as state_lib, step as step_lib

pytestmark = pytest.mark.slow  # trains three small runs


def _lines(workdir):
  with open(f"{workdir}/metrics.jsonl") as f:
    return [json.loads(l) for l in f]


def _adapter_config(tiny_config, base, steps=40):
  c = tiny_config.copy_and_resolve_references()
  c.train.init_from = base
  c.train.steps, c.train.eval_every, c.train.checkpoint_every = steps, 20, 20
  c.lora.rank, c.lora.targets = 4, "all"
  c.opt.learning_rate = 1e-2
  return c


def _weights(workdir):
  wd = workdir_lib.Workdir(workdir)
  cfg = wd.validated(check_tokenizer=False)
  params, buffers = convert.load_on_one_device(wd, cfg)
  return cfg, params, buffers


def _logits(cfg, params, buffers):
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
  graphdef, _, _ = state_lib.abstract_variables(cfg, mesh)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 33)), jnp.int32)
  return np.asarray(step_lib.forward(graphdef, params, buffers, tokens, train=False)[0])


def test_adapter_run_resumes_exactly_merges_and_goes_to_peft_and_back(tiny_config, tmp_path):
  base = str(tmp_path / "base")
  loop.train_and_evaluate(tiny_config, base)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  loop.train_and_evaluate(_adapter_config(tiny_config, base), straight)
  first = loop.train_and_evaluate(_adapter_config(tiny_config, base), resumed, max_steps=20)
  assert first["stopped"] and first["step"] == 20
  loop.train_and_evaluate(_adapter_config(tiny_config, base), resumed)
  a = {r["step"]: r["loss"] for r in _lines(straight) if r["split"] == "train"}
  b = {r["step"]: r["loss"] for r in _lines(resumed) if r["split"] == "train"}
  assert sorted(a) == sorted(b) == list(range(1, 41))
  for s in a:
    assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6), s
  # Step 0 is the base model: the same held-out bits per byte as its last evaluation.
  base_eval = [r for r in _lines(base) if r["split"] == "eval"][-1]
  evals = [r for r in _lines(straight) if r["split"] == "eval"]
  assert evals[0]["step"] == 0
  assert evals[0]["bits_per_byte"] == pytest.approx(base_eval["bits_per_byte"], rel=1e-6)
  assert evals[-1]["bits_per_byte"] < evals[0]["bits_per_byte"]  # it learned

  cfg, params, buffers = _weights(straight)
  _, base_params, _ = _weights(base)
  same = jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), lora.base_of(params),
                      base_params)
  assert jax.tree.all(same)  # only adapters trained

  merged = str(tmp_path / "merged")
  assert adapters.merge(straight, merged) == lora.count(params)
  mcfg, mparams, mbuffers = _weights(merged)
  assert not mcfg.lora.enabled and lora.count(mparams) == 0
  want = _logits(cfg, params, buffers)
  got = _logits(mcfg, mparams, mbuffers)
  assert float(np.max(np.abs(got - want)) / np.max(np.abs(want))) <= 1e-5

  out = tmp_path / "peft"
  fam, config = adapters.to_peft(straight, str(out))
  assert fam.architecture == "MixtralForCausalLM" and config["r"] == 4
  assert sorted(p.name for p in out.iterdir()) == sorted(
      [peft.CONFIG, peft.WEIGHTS, "moex_export.json"])
  back = str(tmp_path / "back")
  bcfg = adapters.from_peft(str(out), base, back)
  assert bcfg.lora.targets == cfg.lora.targets
  _, bparams, bbuffers = _weights(back)
  got = _logits(bcfg, bparams, bbuffers)
  assert float(np.max(np.abs(got - want)) / np.max(np.abs(want))) <= 1e-5

  # Refusals: one line each, through the command.
  def command(*args):
    r = subprocess.run([sys.executable, "-m", "moex.adapters", *args], capture_output=True,
                       text=True, timeout=300)
    return r.returncode, r.stderr.strip().splitlines()

  rc, err = command(f"--workdir={base}", f"--to_peft={tmp_path / 'x'}")
  assert rc == 2 and err[-1] == (f"moex.adapters: --workdir={base}: has no adapters "
                                 "(lora.rank is 0 in its config.json)"), err
  rc, err = command(f"--workdir={tmp_path / 'y'}", f"--from_peft={out}", f"--base={straight}")
  assert rc == 2 and err[-1].startswith(f"moex.adapters: --base={straight}: already has "
                                        "adapters"), err
  rc, err = command(f"--workdir={straight}", f"--merge_to={merged}")
  assert rc == 2 and err[-1] == f"moex.adapters: {merged}: already holds a model; pick a new " \
      "directory", err
