"""moex/interop/peft.py against the real peft: a moex LoRA adapter exported in PEFT's format
and loaded by `peft.PeftModel` onto transformers' model gives moex's logits (1e-4, 256
tokens) for Mixtral and Qwen3-MoE (fused experts through target_parameters) and Llama; an
adapter made by peft reads into moex with peft's logits; the gate and up halves swapped
in the export (a negative control) do not match; unknown keys and wrong shapes are one line.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from etils import epath
from safetensors.numpy import save_file

import interop_tiny
from experiments import tiny
from moex import config as config_lib
from moex.interop import families, hf, peft as peft_lib
from moex.model import lora
from moex.parallel import mesh as mesh_lib
from moex.train import state as state_lib, step as step_lib


NAMES = ("mixtral", "qwen3_moe", "llama")
RANK = 4
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 128))  # 256 tokens


def _import(name, d):
  """(name, family, directory, cfg, params, buffers) of the family's tiny model in d."""
  interop_tiny.hf_model(name).save_pretrained(d)
  cfg, _, _, params, buffers = interop_tiny.load_imported(d)
  fam, _, _, _ = hf.moex_sections(str(d))
  return name, fam, d, cfg, jax.device_get(params), jax.device_get(buffers)


@pytest.fixture(scope="module", params=NAMES)
def imported(request, tmp_path_factory):
  return _import(request.param, tmp_path_factory.mktemp(request.param))


def with_lora(d, rank: int, targets: str, alpha: float | None = None,
              scaling: str = "standard") -> config_lib.Config:
  """The imported model's config with adapters."""
  _, _, model, moe = hf.moex_sections(str(d))
  cd = tiny.get_config()
  cd.model.update(model)
  cd.moe.update(moe)
  cd.lora.rank, cd.lora.targets, cd.lora.scaling = rank, targets, scaling
  cd.lora.alpha = float(alpha if alpha is not None else 2 * rank)
  return config_lib.validate(cd)


def moex_logits(cfg, params, buffers):
  graphdef, _, _ = state_lib.abstract_variables(cfg, mesh_lib.make_mesh(cfg.mesh))
  tokens = jnp.asarray(np.concatenate([TOKENS, TOKENS[:, :1]], 1), jnp.int32)
  fwd = jax.jit(lambda p, b: step_lib.forward(graphdef, p, b, tokens, train=False)[0])
  return np.asarray(fwd(jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, buffers)))


def random_adapters(cfg, seed=0):
  _, abstract, _ = state_lib.abstract_variables(cfg, mesh_lib.make_mesh(cfg.mesh))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.2).astype(np.float32),
                      lora.split(abstract, lora.is_adapter)[0])


def hf_logits(name, adapter_dir):
  model = interop_tiny.hf_model(name)
  model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.float().numpy()


def write(config, tensors, d):
  d.mkdir(parents=True, exist_ok=True)
  (d / peft_lib.CONFIG).write_text(json.dumps(config))
  save_file(tensors, str(d / peft_lib.WEIGHTS), metadata={"format": "pt"})


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_a_moex_adapter_loads_in_peft_with_the_same_logits(imported, tmp_path, scaling):
  name, fam, d, _, params, buffers = imported
  # PEFT renames Qwen3-MoE's dense mlp projections to the experts (see the refusal test).
  cfg = with_lora(d, RANK, "attention,experts" if name == "qwen3_moe" else "all",
                  scaling=scaling)
  full = lora.join(params, random_adapters(cfg))
  want = moex_logits(cfg, full, buffers)
  config, tensors = peft_lib.to_peft(lora.adapters_of(full), cfg, fam)
  assert config["lora_dropout"] == 0.0
  if name != "llama":
    assert config["target_parameters"] and config["rank_pattern"]
  write(config, tensors, tmp_path / "adapter")
  got = hf_logits(name, tmp_path / "adapter")
  err = float(np.max(np.abs(got - want)))
  assert err <= 1e-4, err
  # The adapter matters: without it the logits are far from these.
  base = moex_logits(with_lora(d, 0, "all"), params, buffers)
  assert float(np.max(np.abs(base - want))) > 1e-2
  if name == "llama":
    return
  # Negative control: gate and up halves swapped in the fused export do not match.
  swapped = dict(tensors)
  for key, x in tensors.items():
    if key.endswith("experts.base_layer.lora_B.weight"):
      f = x.shape[0] // 2
      swapped[key] = np.concatenate([x[f:], x[:f]])
  write(config, swapped, tmp_path / "swapped")
  assert float(np.max(np.abs(hf_logits(name, tmp_path / "swapped") - want))) > 1e-3


def _peft_targets(name, cfg):
  modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
  if len(cfg.model.moe_layers) < cfg.model.num_layers:
    modules += ["gate_proj", "up_proj", "down_proj"]
  parameters = (["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if cfg.model.moe_layers
                else None)
  return modules, parameters


def test_a_peft_made_adapter_reads_into_moex_with_peft_logits(imported, tmp_path):
  name, fam, d, cfg, params, buffers = imported
  modules, parameters = _peft_targets(name, cfg)
  torch.manual_seed(1)
  model = peft.get_peft_model(interop_tiny.hf_model(name), peft.LoraConfig(
      r=3, lora_alpha=5, target_modules=modules, target_parameters=parameters,
      rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 7},
      init_lora_weights=False)).eval()  # random A and B
  model.save_pretrained(tmp_path)
  with torch.no_grad():
    want = model(torch.tensor(TOKENS)).logits.float().numpy()
  config, tensors = peft_lib.read(epath.Path(tmp_path))
  tree, targets, rank = peft_lib.from_peft(config, tensors, cfg, fam, "adapter")
  lcfg = with_lora(d, rank, targets, alpha=rank)
  got = moex_logits(lcfg, lora.join(params, tree), buffers)
  err = float(np.max(np.abs(got - want)))
  assert err <= 1e-4, err


def test_the_per_expert_target_modules_layout_reads_too(tmp_path):
  """An older PEFT adapter on Mixtral's hub layout (experts.<e>.w1/w3/w2 as modules)."""
  d = tmp_path / "hub"
  interop_tiny.hf_model("mixtral").save_pretrained(d)
  cfg, _, _, params, buffers = interop_tiny.load_imported(d)
  fam = families.FAMILIES["MixtralForCausalLM"]
  e, dm, f = cfg.moe.num_experts, cfg.model.d_model, cfg.moe.d_expert
  rng = np.random.default_rng(2)
  tensors, weights = {}, {}
  for n in range(cfg.model.num_layers):
    for i in range(e):
      for w, (out, inp) in (("w1", (f, dm)), ("w3", (f, dm)), ("w2", (dm, f))):
        m = f"model.layers.{n}.block_sparse_moe.experts.{i}.{w}"
        a, b = rng.normal(size=(2, inp)) * 0.2, rng.normal(size=(out, 2)) * 0.2
        tensors[f"base_model.model.{m}.lora_A.weight"] = a.astype(np.float32)
        tensors[f"base_model.model.{m}.lora_B.weight"] = b.astype(np.float32)
        weights[m] = 2.0 * b @ a  # scale alpha / r = 4 / 2
  config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["w1", "w2", "w3"]}
  tree, targets, rank = peft_lib.from_peft(config, tensors, cfg, fam, "adapter")
  assert (targets, rank) == ("experts", 2)
  lcfg = with_lora(d, rank, targets, alpha=rank)
  merged = lora.merged(lora.join(params, tree), lcfg.lora)
  got = np.asarray(merged["block_0"]["ffn"]["experts"]["gate_ExDxF"][3])
  base = np.asarray(params["block_0"]["ffn"]["experts"]["gate_ExDxF"][3])
  np.testing.assert_allclose(got - base, weights[
      "model.layers.0.block_sparse_moe.experts.3.w1"].T, rtol=1e-5, atol=1e-6)


def test_bad_peft_files_are_one_line(tmp_path):
  _, fam, d, cfg, params, _ = _import("mixtral", tmp_path)
  lcfg = with_lora(d, RANK, "attention")
  config, tensors = peft_lib.to_peft(lora.adapters_of(
      lora.join(params, random_adapters(lcfg))), lcfg, fam)
  bad = dict(tensors, **{"base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight":
                         np.zeros((1, 1), np.float32)})
  with pytest.raises(peft_lib.PeftError, match=r"^adapter: unknown key .*lora_C\.weight"):
    peft_lib.from_peft(config, bad, cfg, fam, "adapter")
  key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
  wrong = dict(tensors, **{key: np.zeros((RANK, 7), np.float32)})
  with pytest.raises(peft_lib.PeftError, match=r"^adapter: model.layers.0.self_attn.q_proj: "
                     r"lora_A \(4, 7\) and lora_B \(32, 4\) do not fit its weight \(32, 32\)"):
    peft_lib.from_peft(config, wrong, cfg, fam, "adapter")
  with pytest.raises(peft_lib.PeftError, match=r"^adapter: use_dora=True is not supported"):
    peft_lib.from_peft(dict(config, use_dora=True), tensors, cfg, fam, "adapter")
  _, qwen, qd, _, qparams, _ = _import("qwen3_moe", tmp_path / "qwen")
  dense = with_lora(qd, RANK, "dense")
  with pytest.raises(peft_lib.PeftError, match=r"^block_1/ffn/lora_down: PEFT renames "
                     r"model.layers.1.mlp.down_proj on qwen3_moe models to the fused experts"):
    peft_lib.to_peft(lora.adapters_of(lora.join(qparams, random_adapters(dense))), dense, qwen)
  router = dataclasses.replace(lcfg, lora=dataclasses.replace(lcfg.lora, train_router=True))
  with pytest.raises(peft_lib.PeftError, match=r"^lora.train_router: the routers were trained"):
    peft_lib.to_peft({}, router, fam)
