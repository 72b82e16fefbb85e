"""moex/interop: Hugging Face checkpoints -> moex computes transformers' logits, and back.

Tiny random models built here (no download), float32, transformers' eager experts, a
512-token sequence with GQA. Each family also has a negative control: the same checkpoint
with gate and up projections swapped must fail the same comparison.
"""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch
import interop_tiny
import multidevice_run

from experiments import tiny
from moex import config as config_lib
from moex.interop import families, hf
from moex.parallel import mesh as mesh_lib
from moex.train import state as state_lib

SEQ = 512
_COMMON = interop_tiny.COMMON
FAMILIES = interop_tiny.FAMILIES
_hf_model = interop_tiny.hf_model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hub_dir(request, tmp_path_factory):
  """(family name, a save_pretrained directory, reference logits [1, SEQ, V], tokens)."""
  d = tmp_path_factory.mktemp(request.param)
  _hf_model(request.param).save_pretrained(d)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      d, dtype=torch.float32, experts_implementation="eager", attn_implementation="eager")
  tokens = np.random.default_rng(0).integers(0, _COMMON["vocab_size"], (1, SEQ))
  with torch.no_grad():
    logits = ref(torch.tensor(tokens)).logits.numpy()
  return request.param, d, logits, tokens


def _moex_logits(directory, tokens):
  cfg, _, graphdef, params, buffers = interop_tiny.load_imported(directory)
  net = nnx.merge(graphdef, params, buffers)
  logits, _ = jax.jit(lambda t: net(t, train=False))(tokens)
  return np.asarray(logits), cfg


def test_import_matches_transformers(hub_dir):
  name, d, want, tokens = hub_dir
  got, cfg = _moex_logits(d, tokens)
  diff = float(np.max(np.abs(got - want)))
  print(f"{name}: max |dlogit| = {diff:.2e} over {SEQ} tokens")
  assert diff <= 1e-4, f"{name}: max |dlogit| {diff}"
  assert np.array_equal(got.argmax(-1), want.argmax(-1))
  assert np.std(want) > 0.3  # logits far from uniform: the comparison can fail
  if name == "qwen3_moe":
    assert cfg.model.moe_layers == (0, 2) and cfg.model.head_dim == 12


def test_negative_control_gate_up_swapped_fails(hub_dir, tmp_path):
  name, d, want, tokens = hub_dir
  tensors = load_file(str(d / "model.safetensors"))
  swap = {"w1": "w3", "w3": "w1", "gate_proj": "up_proj", "up_proj": "gate_proj"}
  renamed = {}
  for k, v in tensors.items():
    parts = k.split(".")
    renamed[".".join(swap.get(p, p) for p in parts)] = v
  save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  (tmp_path / "config.json").write_text((d / "config.json").read_text())
  got, _ = _moex_logits(tmp_path, tokens)
  assert float(np.max(np.abs(got - want))) > 1e-2


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_fused_expert_layout_reads_the_same(name, tmp_path):
  """transformers 5 holds experts fused (gate_up_proj [E, 2F, D], down_proj [E, D, F])."""
  model = _hf_model(name)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert any(k.endswith("experts.gate_up_proj") for k in state)
  save_torch(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  model.config.architectures = [type(model).__name__]
  model.config.save_pretrained(tmp_path)
  tokens = np.random.default_rng(1).integers(0, _COMMON["vocab_size"], (1, 64))
  model.config._experts_implementation = "eager"  # pylint: disable=protected-access
  with torch.no_grad():
    want = model(torch.tensor(tokens)).logits.numpy()
  got, _ = _moex_logits(tmp_path, tokens)
  assert float(np.max(np.abs(got - want))) <= 1e-4


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def test_export_round_trip_loads_in_transformers_without_warnings(hub_dir, tmp_path, caplog):
  """moex params -> hub-layout dir -> from_pretrained: same logits, no missing/unexpected."""
  name, d, want, tokens = hub_dir
  fam, _, model, moe = hf.moex_sections(str(d))
  cd = tiny.get_config()
  cd.model.update(model)
  cd.moe.update(moe)
  cfg = config_lib.validate(cd)
  _, abs_params, _ = state_lib.abstract_variables(cfg, mesh_lib.make_mesh(cfg.mesh))
  params = hf.load_params(str(d), cfg, abs_params, fam)
  out = tmp_path / "export"
  # Small shards: the index path is exercised too.
  hf.export(lambda path: _get(params, path), cfg, str(out), architecture=fam.architecture,
            max_shard_bytes=64 << 10)
  assert not (tmp_path / "export.partial").exists()
  assert json.loads((out / hf.safetensors_dir.MARKER).read_text())["architecture"] == (
      fam.architecture)
  assert json.loads((out / "config.json").read_text())["architectures"] == [fam.architecture]
  transformers.utils.logging.enable_propagation()  # its warnings reach caplog
  try:
    with caplog.at_level("WARNING"):
      back, info = transformers.AutoModelForCausalLM.from_pretrained(
          out, dtype=torch.float32, experts_implementation="eager",
          attn_implementation="eager", output_loading_info=True)
  finally:
    transformers.utils.logging.disable_propagation()
  assert all(not v for v in info.values()), info
  assert "were not used" not in caplog.text and "newly initialized" not in caplog.text
  with torch.no_grad():
    got = back(torch.tensor(tokens)).logits.numpy()
  assert float(np.max(np.abs(got - want))) <= 1e-4
  index = json.loads((out / hf.safetensors_dir.INDEX).read_text())["weight_map"]
  assert len(set(index.values())) > 1
  if fam.moe:  # the hub's per-expert layout, not the fused one
    assert any(".experts.0." in k for k in index)
    assert not any(k.endswith("gate_up_proj") for k in index)


# ---------------------------------------------------------------------------------------
# Bad input: one line naming the file or key.


def _config_dir(tmp_path, name="mixtral", **changes):
  d = tmp_path / "m"
  d.mkdir(exist_ok=True)
  _hf_model(name).save_pretrained(d)
  cfg = json.loads((d / "config.json").read_text())
  for k, v in changes.items():
    if v is _DELETE:
      cfg.pop(k)
    else:
      cfg[k] = v
  (d / "config.json").write_text(json.dumps(cfg))
  return d


_DELETE = object()


@pytest.mark.parametrize("name,changes,fragment", [
    ("mixtral", {"sliding_window": 4096}, "sliding_window=4096: moex implements only None"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_parameters.rope_type='llama3'"),
    ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling="),
    ("llama", {"attention_bias": True}, "attention_bias=True: moex implements only False"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
    ("qwen3_moe", {"use_sliding_window": True}, "use_sliding_window=True"),
    ("llama", {"tie_word_embeddings": True}, "tie_word_embeddings=true"),
    ("llama", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config:"),
    ("llama", {"num_nextn_predict_layers": 1}, "num_nextn_predict_layers:"),
    ("llama", {"architectures": ["DeepseekV3ForCausalLM"]}, "architectures=['DeepseekV3"),
    ("llama", {"some_new_feature": 3}, "some_new_feature: a LlamaForCausalLM key moex does"),
    ("llama", {"hidden_size": _DELETE}, "hidden_size: missing"),
])
def test_unsupported_config_keys_are_refused_naming_the_key(tmp_path, name, changes, fragment):
  d = _config_dir(tmp_path, name, **changes)
  with pytest.raises(families.Unsupported) as e:
    hf.moex_sections(str(d))
  assert fragment in str(e.value) and str(d / "config.json") in str(e.value)
  assert "\n" not in str(e.value)


def test_missing_files_and_wrong_shapes_name_the_file(tmp_path):
  with pytest.raises(hf.FormatError, match="config.json: missing"):
    hf.moex_sections(str(tmp_path))
  d = _config_dir(tmp_path, "llama")
  tensors = load_file(str(d / "model.safetensors"))
  tensors["model.layers.1.self_attn.q_proj.weight"] = np.zeros((8, 32), np.float32)
  save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(hf.FormatError) as e:
    _moex_logits(d, np.zeros((1, 8), np.int64))
  assert str(e.value) == (f"{d / 'model.safetensors'}: tensor model.layers.1.self_attn.q_proj"
                          ".weight has shape (8, 32), config.json implies (32, 32)")
  tensors["model.layers.1.self_attn.q_proj.weight"] = np.zeros((32, 32), np.float32)
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros((32,), np.float32)
  save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(hf.FormatError, match=r"tensor model.layers.0.self_attn.q_proj.bias has "
                     "no place"):
    _moex_logits(d, np.zeros((1, 8), np.int64))
  (d / "model.safetensors").unlink()
  with pytest.raises(hf.FormatError, match=r"no model.safetensors, \*.safetensors"):
    _moex_logits(d, np.zeros((1, 8), np.int64))


@pytest.mark.slow
def test_import_onto_an_expert_parallel_mesh(tmp_path):
  """Each device reads only its experts; the logits are those of one device."""
  stdout, _ = multidevice_run.run("interop_mesh.py", timeout=600)
  out = json.loads(stdout.strip().splitlines()[-1])
  assert len(out["shards"]) == 8 and all(s == [2, 32, 24] for s in out["shards"])
  assert out["max_diff"] <= 1e-5


def test_bfloat16_checkpoint_stays_bfloat16(tmp_path):
  model = _hf_model("qwen3_moe").to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  fam, hf_config, model_section, _ = hf.moex_sections(str(tmp_path))
  assert hf_config["dtype"] == "bfloat16"
  assert model_section["param_dtype"] == model_section["dtype"] == "bfloat16"
  cd = tiny.get_config()
  cd.model.update(model_section)
  cd.moe.update(hf.moex_sections(str(tmp_path))[3])
  cfg = config_lib.validate(cd)
  _, abs_params, _ = state_lib.abstract_variables(cfg, mesh_lib.make_mesh(cfg.mesh))
  params = hf.load_params(str(tmp_path), cfg, abs_params, fam)
  dtypes = {"/".join(map(str, (getattr(k, "key", k) for k in path))): v.dtype
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert dtypes["block_0/ffn/router/kernel_DxE"] == np.float32  # moex's router is float32
  assert {str(d) for k, d in dtypes.items() if "router" not in k} == {"bfloat16"}
  want = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].float().numpy()
  got = np.asarray(params["block_0"]["attn"]["q_DxHxA"], np.float32)
  np.testing.assert_array_equal(got.reshape(got.shape[0], -1).T, want)  # bit-exact


def test_export_refuses_a_table_that_leaves_out_a_parameter():
  """A model tensor the family's table lacks is refused, not silently left out of OUT."""
  cfg = config_lib.validate(tiny.get_config(), vocab_size=259)
  fam, _ = families.from_moex(cfg.model, cfg.moe, None)
  rules = fam.tensors(cfg.model, cfg.moe, fam.hub_layout())
  hf.check_covers(rules, cfg, fam)  # the whole tree: nothing to say
  with pytest.raises(families.Unsupported) as e:
    hf.check_covers(rules[1:], cfg, fam)
  assert str(e.value) == (
      f"export to {fam.architecture}: the model has {rules[0].path}, which the family's "
      "tensor table does not write; add it to the family (moex/interop/families/) or export "
      "to another --architecture")
  with pytest.raises(families.Unsupported, match="not once in the model's tree"):
    hf.check_covers(rules + rules[:1], cfg, fam)
