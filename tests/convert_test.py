"""moex/convert.py and moex/interop/convert.py: import a transformers checkpoint, fine-tune
it, export it, load it back; and what the command does on bad input and on interruption.

One tiny Mixtral with a BPE tokenizer trained here (no download) goes through the whole
flow of experiments/finetune.py: the fine-tune's step-0 evaluation must equal transformers'
own cross-entropy on the same batches (the import is exact through the workdir), and the
exported fine-tuned model must compute the fine-tuned moex logits in transformers. Kills are
injected by raising `_Killed` (a BaseException nothing catches) at the chosen moment.
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
from etils import epath
from flax import nnx

from experiments import finetune
from moex import config as config_lib
from moex import errors
from moex.data import pipeline, tokenizer as tokenizer_lib
from moex.interop import convert, hf, safetensors_dir
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
  # A bad --config override: one line, not a traceback (it was one: issue 24).
  r = _convert(f"--from_hf={tmp_path / 'nothing'}", f"--workdir={tmp_path / 'w'}",
               "--config.data.no_such_key=3")
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == (
      f"moex.convert: config error: --config.data.no_such_key: {ROOT / 'experiments' / 'tiny.py'}"
      " has no key data.no_such_key")


def test_a_failed_import_leaves_no_model_behind(tmp_path, tiny_config):
  """config.json is written last: a workdir whose import failed holds no config or params."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  hub = tmp_path / "hub"
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=300, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      num_key_value_heads=1, intermediate_size=24)).save_pretrained(hub)
  tensors = load_file(str(hub / "model.safetensors"))
  tensors["model.layers.1.mlp.down_proj.weight"] = np.zeros((16, 23), np.float32)
  save_file(tensors, str(hub / "model.safetensors"), metadata={"format": "pt"})
  work = tmp_path / "w"
  with pytest.raises(hf.FormatError, match="down_proj.weight has shape"):
    convert.import_hf(str(hub), str(work), tiny_config, tokenizer="byte")
  assert not (work / "config.json").exists() and not (work / "params").exists()
  with pytest.raises(convert.ConvertError, match="already holds"):  # a finished import
    (work / "config.json").write_text("{}")
    convert.import_hf(str(hub), str(work), tiny_config, tokenizer="byte")


# ---------------------------------------------------------------------------------------
# Faults: bad flags and paths, kills between writes, export targets (issue 25).


class _Killed(BaseException):
  """An injected kill: nothing in moex catches it, as nothing runs after a SIGKILL."""


def _llama_hub(d: pathlib.Path) -> pathlib.Path:
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=300, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      num_key_value_heads=1, intermediate_size=24)).save_pretrained(d)
  return d


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(HF directory, the moex workdir imported from it with the byte tokenizer, base config)."""
  import conftest  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("imported")
  base = conftest._tiny(conftest._write_corpus(root / "corpus"), str(root / "cache"))  # pylint: disable=protected-access
  hub = _llama_hub(root / "hub")
  convert.import_hf(str(hub), str(root / "w"), base, tokenizer="byte")
  return hub, root / "w", base


def test_bad_flags_and_paths_are_one_line(imported, tmp_path):
  hub, work, base = imported
  for bad in (float("nan"), float("inf"), 0.0):
    with pytest.raises(convert.ConvertError) as e:
      convert.export_hf(str(work), str(tmp_path / "out"), max_shard_gb=bad)
    assert str(e.value) == f"--max_shard_gb={bad}: must be a finite number > 0"
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(errors.Refusal, match=r"^--from_hf=.*a_file: is a file, not a directory$"):
    convert.import_hf(str(a_file), str(tmp_path / "w2"), base, tokenizer="byte")
  with pytest.raises(errors.Refusal, match=r"^--workdir=.*a_file: is a file, not a directory$"):
    convert.export_hf(str(a_file), str(tmp_path / "out"))
  with pytest.raises(errors.Refusal, match=r"^--to_hf=.*a_file: is a file, not a directory"):
    convert.export_hf(str(work), str(a_file))
  assert a_file.read_text() == "x" and not (tmp_path / "w2").exists()


def test_hf_directory_without_a_tokenizer_names_it(tmp_path, tiny_config):
  """generation_config.json alone is no tokenizer: the refusal names the source directory
  and the --tokenizer=byte way out (it named the new workdir's tokenizer/: issue 25 #7)."""
  hub = _llama_hub(tmp_path / "hub")
  assert (hub / "generation_config.json").exists()
  work = tmp_path / "w"
  with pytest.raises(errors.Refusal) as e:
    convert.import_hf(str(hub), str(work), tiny_config)
  assert str(e.value) == (f"{hub}: no tokenizer.json or tokenizer.model; pass "
                          "--tokenizer=PATH (or --tokenizer=byte)")
  assert not work.exists()


def test_an_import_killed_before_config_json_is_redone(tmp_path, tiny_config, monkeypatch):
  """Killed after params/ and before config.json, the same command run again completes
  (it refused: "already holds a model", issue 25 #3)."""
  hub = _llama_hub(tmp_path / "hub")
  work = tmp_path / "w"
  save = init_from.save_params

  def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    raise _Killed()

  monkeypatch.setattr(init_from, "save_params", save_then_die)
  with pytest.raises(_Killed):
    convert.import_hf(str(hub), str(work), tiny_config, tokenizer="byte")
  assert (work / "params").exists() and not (work / "config.json").exists()
  monkeypatch.setattr(init_from, "save_params", save)
  cfg = convert.import_hf(str(hub), str(work), tiny_config, tokenizer="byte")
  assert json.loads((work / "config.json").read_text())["model"]["d_model"] == 16
  assert cfg.model.num_layers == 2 and (work / "hf_source.json").exists()
  with pytest.raises(convert.ConvertError, match="already holds a model"):  # now finished
    convert.import_hf(str(hub), str(work), tiny_config, tokenizer="byte")


def test_export_refuses_a_directory_that_is_not_an_export(imported, tmp_path):
  """--to_hf=DIR holding a user's files is refused and left as it was (it was deleted,
  exit 0: issue 25 #1); --overwrite replaces it; the workdir and cwd never are."""
  _, work, _ = imported
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  with pytest.raises(errors.Refusal) as e:
    convert.export_hf(str(work), str(out))
  assert str(e.value) == (f"--to_hf={out}: holds files that are not a moex export (no "
                          "moex_export.json); pick a new or empty directory, or pass "
                          "--overwrite to replace it")
  assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
  assert (out / "notes.txt").read_text() == "keep me"
  for target in (work, work.parent, pathlib.Path.cwd()):
    with pytest.raises(errors.Refusal, match="moex never replaces it, even with --overwrite"):
      convert.export_hf(str(work), str(target), overwrite=True)
  assert (work / "config.json").exists()
  convert.export_hf(str(work), str(out), overwrite=True)
  assert not (out / "notes.txt").exists() and (out / safetensors_dir.MARKER).exists()


def test_export_replaces_an_earlier_export(imported, tmp_path):
  _, work, _ = imported
  out = tmp_path / "out"
  out.mkdir()  # an empty directory is fine
  convert.export_hf(str(work), str(out))
  marker = json.loads((out / safetensors_dir.MARKER).read_text())
  assert marker["workdir"] == str(work) and marker["architecture"] == "LlamaForCausalLM"
  assert set(marker["files"]) == {p.name for p in out.iterdir()} - {safetensors_dir.MARKER}
  (out / "stale.safetensors").write_text("from an older export")
  convert.export_hf(str(work), str(out))
  assert not (out / "stale.safetensors").exists()
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  want = load_file_np(out / "model.safetensors")["model.embed_tokens.weight"]
  np.testing.assert_array_equal(back.model.embed_tokens.weight.detach().numpy(), want)
  assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out.moex-previous").exists()


def load_file_np(path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(str(path))


@pytest.mark.parametrize("rerun", ["export", "check_target"])
def test_an_export_killed_between_the_renames_recovers(imported, tmp_path, monkeypatch, rerun):
  """Killed while OUT is being swapped, the old copy is kept aside (with rmtree then rename
  neither copy was left: issue 25 #1); the next run puts it back, then replaces it."""
  _, work, _ = imported
  out = tmp_path / "out"
  convert.export_hf(str(work), str(out))
  (out / "old.txt").write_text("the old copy")
  cls = type(epath.Path(out))
  rename = cls.rename

  def die_moving_in(self, target):
    if os.path.abspath(os.fspath(target)) == str(out):  # the new copy's move into OUT
      raise _Killed()
    return rename(self, target)

  monkeypatch.setattr(cls, "rename", die_moving_in)
  with pytest.raises(_Killed):
    convert.export_hf(str(work), str(out))
  monkeypatch.setattr(cls, "rename", rename)
  aside = tmp_path / "out.moex-previous"
  assert not out.exists() and (aside / "old.txt").read_text() == "the old copy"
  if rerun == "check_target":  # what the next run does first: the old copy is back
    safetensors_dir.check_target(epath.Path(out))
    assert (out / "old.txt").read_text() == "the old copy" and not aside.exists()
  convert.export_hf(str(work), str(out))  # the same command again completes
  assert not (out / "old.txt").exists() and (out / safetensors_dir.MARKER).exists()
  assert not aside.exists() and not (tmp_path / "out.partial").exists()
  transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def test_a_swap_killed_before_the_old_copy_is_removed_is_finished(tmp_path):
  """The new copy is in, the old one still aside: the next run removes only the old one."""
  out, aside = tmp_path / "out", tmp_path / "out.moex-previous"
  out.mkdir()
  (out / safetensors_dir.MARKER).write_text("{}")
  aside.mkdir()
  (aside / "old.txt").write_text("the old copy")
  safetensors_dir.check_target(epath.Path(out))
  assert (out / safetensors_dir.MARKER).exists() and not aside.exists()
