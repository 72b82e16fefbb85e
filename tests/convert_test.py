"""moex/convert.py: import a transformers checkpoint, fine-tune it, export it, load it back.

One tiny Mixtral with a BPE tokenizer trained here (no download) goes through the whole
flow of experiments/finetune.py: the fine-tune's step-0 evaluation must equal transformers'
own cross-entropy on the same batches (the import is exact through the workdir), and the
exported fine-tuned model must compute the fine-tuned moex logits in transformers.
"""

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

from experiments import finetune
from moex import config as config_lib
from moex.data import pipeline, tokenizer as tokenizer_lib
from moex.parallel import mesh as mesh_lib
from moex.train import init_from, loop, state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _convert(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "moex.convert", *args], capture_output=True,
                        text=True, timeout=300, env=env, cwd=str(ROOT))


def _data_overrides(cfg):
  d = cfg.data
  return [f"--config.data.{k}={getattr(d, k)}" for k in
          ("source", "cache_dir", "seq_len", "batch_size", "eval_batches", "val_fraction")]


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens, np.int64))).logits.numpy()


@pytest.mark.slow
def test_import_finetune_export(tmp_path, tiny_config, bpe_dir):
  tok = tokenizer_lib.get_tokenizer(str(bpe_dir))
  torch.manual_seed(0)
  hf_cfg = transformers.MixtralConfig(
      vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
      initializer_range=0.1)
  hub = tmp_path / "hub"
  transformers.MixtralForCausalLM(hf_cfg).save_pretrained(hub)
  shutil.copy(bpe_dir / "tokenizer.json", hub / "tokenizer.json")
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      hub, dtype=torch.float32, experts_implementation="eager").eval()

  imported = tmp_path / "imported"
  r = _convert(f"--from_hf={hub}", f"--workdir={imported}", *_data_overrides(tiny_config))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "imported" in r.stdout and "--config.train.init_from=" in r.stdout
  for f in ("config.json", "params", "tokenizer/tokenizer.json", "hf_source.json"):
    assert (imported / f).exists(), f

  cd = finetune.get_config(str(imported))
  cd.train.update(steps=3, eval_every=3, checkpoint_every=3, log_every=1,
                  async_checkpointing=False)
  cd.opt.update(warmup_steps=1, learning_rate=1e-2)
  tuned = tmp_path / "tuned"
  result = loop.train_and_evaluate(cd, str(tuned))
  assert result["step"] == 3

  # Step 0 evaluated the imported parameters: transformers' own cross-entropy on those batches.
  cfg = config_lib.validate(cd, vocab_size=tok.vocab_size)
  batches = pipeline.build(cfg.data, cfg.seed).eval_batches
  ce, n = 0.0, 0
  for b in batches:
    logits = torch.tensor(_hf_logits(ref, b["tokens"][:, :-1]))
    targets = torch.tensor(np.asarray(b["tokens"][:, 1:], np.int64))
    ce += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                  reduction="sum"))
    n += targets.numel()
  step0 = [json.loads(l) for l in (tuned / "metrics.jsonl").read_text().splitlines()][0]
  assert step0["step"] == 0 and step0["split"] == "eval"
  assert abs(step0["loss"] - ce / n) < 1e-4, (step0["loss"], ce / n)

  exported = tmp_path / "exported"
  r = _convert(f"--to_hf={exported}", f"--workdir={tuned}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "MixtralForCausalLM" in r.stdout
  assert (exported / "tokenizer.json").read_bytes() == (bpe_dir / "tokenizer.json").read_bytes()
  back, info = transformers.AutoModelForCausalLM.from_pretrained(
      exported, dtype=torch.float32, experts_implementation="eager", output_loading_info=True)
  assert all(not v for v in info.values()), info
  exported_cfg = json.loads((exported / "config.json").read_text())
  assert exported_cfg["eos_token_id"] == hf_cfg.eos_token_id  # from hf_source.json

  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, abs_p, abs_b = state_lib.abstract_variables(cfg, mesh)
  params, buffers = init_from.load_params(str(tuned), abs_p, abs_b)
  tokens = batches[0]["tokens"][:, :-1]
  with jax.set_mesh(mesh):
    ours = np.asarray(nnx.merge(graphdef, params, buffers)(tokens, train=False)[0])
  theirs = _hf_logits(back, tokens)
  assert float(np.max(np.abs(ours - theirs))) <= 1e-4
  assert float(np.max(np.abs(theirs - _hf_logits(ref, tokens)))) > 1e-3  # it was tuned


@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path):
  r = _convert(f"--from_hf={tmp_path / 'nothing'}", f"--workdir={tmp_path / 'w'}")
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1] == (
      f"moex.convert: {tmp_path / 'nothing' / 'config.json'}: missing (not a Hugging Face "
      "model directory)")
  r = _convert(f"--to_hf={tmp_path / 'out'}", f"--workdir={tmp_path / 'w'}")
  assert r.stderr.strip().splitlines()[-1].startswith(
      f"moex.convert: {tmp_path / 'w' / 'config.json'}: missing")
  r = _convert(f"--workdir={tmp_path / 'w'}")
  assert r.stderr.strip().splitlines()[-1] == (
      "moex.convert: give --workdir and exactly one of --from_hf / --to_hf")


def test_a_failed_import_leaves_no_model_behind(tmp_path, tiny_config):
  """config.json is written last: a workdir whose import failed holds no config or params."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  from moex import convert  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  hub = tmp_path / "hub"
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=300, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      num_key_value_heads=1, intermediate_size=24)).save_pretrained(hub)
  tensors = load_file(str(hub / "model.safetensors"))
  tensors["model.layers.1.mlp.down_proj.weight"] = np.zeros((16, 23), np.float32)
  save_file(tensors, str(hub / "model.safetensors"), metadata={"format": "pt"})
  work = tmp_path / "w"
  with pytest.raises(convert.hf.FormatError, match="down_proj.weight has shape"):
    convert.import_hf(str(hub), str(work), tiny_config, tokenizer="byte")
  assert not (work / "config.json").exists() and not (work / "params").exists()
  with pytest.raises(convert.ConvertError, match="already holds"):  # a finished import
    (work / "config.json").write_text("{}")
    convert.import_hf(str(hub), str(work), tiny_config, tokenizer="byte")
