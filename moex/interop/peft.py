"""LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors), both ways.

Names come from the family's tensor table (moex/interop/families): a moex adapter of the
weight whose Hugging Face tensor is `<module>.weight` is PEFT's `<module>.lora_A/B.weight`
(lora_A [r, in], lora_B [out, r]; `target_modules`). Routed experts use transformers 5's
fused layout through PEFT's `target_parameters`: `<mlp>.experts.gate_up_proj` [E, 2F, D] and
`<mlp>.experts.down_proj` [E, D, F], whose wrapper keeps lora_A [E*r, in] (row e*r + j) and
lora_B [out, r*E] (column j*E + e). moex's separate rank-r gate and up adapters become one
block-structured adapter of rank 2r on the fused tensor (`rank_pattern`, `alpha_pattern`);
with both experts tensors targeted PEFT nests the wrappers, gate_up_proj's inside
(`experts.base_layer.lora_*`), down_proj's outside (`experts.lora_*`).

Scales: the export writes PEFT's r and lora_alpha (and use_rslora) so that every scale is
moex's; the import folds each module's PEFT scale into B, so moex's adapters have scale 1
(alpha = rank) and a rank that is the largest it needs (smaller ones padded with zeros:
exact). A PEFT adapter of the older per-expert layout (experts.<e>.w1/w3/w2 or
gate_proj/up_proj/down_proj as target_modules) is read too. PEFT's parameter wrapper has
no dropout, so the export writes lora_dropout 0 (dropout changes training only).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from moex import errors
from moex.config import LORA_TARGETS, Config
from moex.interop import families
from moex.model import lora, params as params_lib

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


class PeftError(ValueError, errors.Refusal):
  """A one-line reason an adapter cannot go to or come from PEFT's format."""


# Module names PEFT (0.21, utils/transformers_weight_conversion.py) renames to the fused
# experts on these model types whatever layer they are in, as transformers 4's expert names:
# a moex adapter on a dense block's projection of that name would load onto the experts.
_RENAMED_BY_PEFT = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
                    "mixtral": ("w1", "w2", "w3")}


def _layout(fam: families.Family) -> families.Layout:
  """transformers 5's in-memory layout (what PEFT's target_parameters address)."""
  return families.Layout("mlp", fused=True) if fam.fused else fam.hub_layout()


def _table(cfg: Config, fam: families.Family, layout: families.Layout) -> dict:
  return {t.path: t for t in fam.tensors(cfg.model, cfg.moe, layout)}


def _modules(tree: dict, path: tuple = ()):
  """(parent dict, path of the adapter module, module dict) for every adapter."""
  for k, v in tree.items():
    if not isinstance(v, dict):
      continue
    if k.startswith(lora.PREFIX):
      yield tree, path + (k,), v
    else:
      yield from _modules(v, path + (k,))


def _ab(module: dict) -> tuple[np.ndarray, np.ndarray]:
  a = next(v for k, v in module.items() if k.startswith("a_"))
  b = next(v for k, v in module.items() if k.startswith("b_"))
  return np.asarray(a, np.float32), np.asarray(b, np.float32)


# ---------------------------------------------------------------------------------------
# moex -> PEFT


def to_peft(params: dict, cfg: Config, fam: families.Family,
            base_model: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json dict, {safetensors key: array}) of a moex adapter run's params."""
  lo = cfg.lora
  if lo.train_router:
    raise PeftError("lora.train_router: the routers were trained in full, which a PEFT LoRA "
                    "adapter cannot carry; merge the adapters into a workdir instead "
                    "(python -m moex.adapters --merge_to=DIR)")
  layout = _layout(fam)
  table = _table(cfg, fam, layout)
  r, s = lo.rank, lo.scale
  modules, parameters, tensors = [], [], {}
  rank_pattern, alpha_pattern = {}, {}
  experts = {}  # "model.layers.N.mlp.experts" -> {"gate": (a, b), "up": .., "down": ..}
  for parent, path, module in _modules(params):
    weight = lora.weight_name(path[-1], module)
    t = table.get(path[:-1] + (weight,))
    if t is None:
      raise PeftError(f"{'/'.join(path)}: {fam.architecture} has no tensor for "
                      f"{'/'.join(path[:-1] + (weight,))}; PEFT cannot express this adapter")
    a, b = _ab(module)
    name = t.hub[0][0]
    if t.stacked:  # routed experts, fused: collected, then written per experts module
      if not layout.fused:
        raise PeftError(f"{fam.architecture}: experts are not fused in transformers; "
                        "PEFT's target_parameters cannot address them")
      experts.setdefault(name.rsplit(".", 1)[0], {})[path[-1][len(lora.PREFIX):]] = (a, b)
      continue
    target = name[:-len(".weight")]
    if target.rsplit(".", 1)[-1] in _RENAMED_BY_PEFT.get(fam.model_type, ()):
      raise PeftError(f"{'/'.join(path)}: PEFT renames {target} on {fam.model_type} models "
                      "to the fused experts, so it cannot carry this dense block's adapter; "
                      "leave dense out of lora.targets or merge instead (--merge_to)")
    modules.append(target)
    tensors[f"{_PREFIX}{target}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
    tensors[f"{_PREFIX}{target}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
  for mod, parts in sorted(experts.items()):
    (ag, bg), (au, bu), (ad, bd) = parts["gate"], parts["up"], parts["down"]
    e, f = bg.shape[0], bg.shape[2]
    # gate_up: A [E, 2r, D] = (A_gate^T; A_up^T); B [E, 2F, 2r] block-diagonal.
    a_fused = np.concatenate([ag.transpose(0, 2, 1), au.transpose(0, 2, 1)], axis=1)
    b_fused = np.zeros((e, 2 * f, 2 * r), np.float32)
    b_fused[:, :f, :r] = bg.transpose(0, 2, 1)
    b_fused[:, f:, r:] = bu.transpose(0, 2, 1)
    gate_up, down = f"{mod}.gate_up_proj", f"{mod}.down_proj"
    parameters += [gate_up, down]
    rank_pattern[gate_up] = 2 * r
    alpha_pattern[gate_up] = s * (math.sqrt(2 * r) if lo.scaling == "rslora" else 2 * r)
    for key, a_e, b_e in ((f"{mod}.base_layer", a_fused, b_fused),
                          (mod, ad.transpose(0, 2, 1), bd.transpose(0, 2, 1))):
      tensors[f"{_PREFIX}{key}.lora_A.weight"] = np.ascontiguousarray(
          a_e.reshape(-1, a_e.shape[-1]))
      tensors[f"{_PREFIX}{key}.lora_B.weight"] = np.ascontiguousarray(
          b_e.transpose(1, 2, 0).reshape(b_e.shape[1], -1))
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": lo.alpha,
      "use_rslora": lo.scaling == "rslora", "lora_dropout": 0.0, "bias": "none",
      "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
      "target_modules": sorted(modules) or None, "target_parameters": parameters or None,
      "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
      "base_model_name_or_path": base_model, "use_dora": False, "modules_to_save": None,
  }
  return config, tensors


# ---------------------------------------------------------------------------------------
# PEFT -> moex


def _scale(config: dict, target: str, rank: int) -> float:
  """PEFT's scale of one target: lora_alpha (or alpha_pattern's) over r or sqrt(r)."""
  alpha = config.get("lora_alpha", 8)
  for key, value in (config.get("alpha_pattern") or {}).items():
    if re.match(rf"(.*\.)?({key})$", target):
      alpha = value
      break
  return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def check_config(config: dict, file: str) -> None:
  """Refuses, in one line naming the key, what moex cannot read as plain LoRA."""
  if config.get("peft_type") != "LORA":
    raise PeftError(f"{file}: peft_type={config.get('peft_type')!r}; moex reads LORA adapters")
  for key, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
    if config.get(key, ok) not in (ok, None):
      raise PeftError(f"{file}: {key}={config[key]!r} is not supported (moex reads {key}="
                      f"{ok!r})")
  for key in ("modules_to_save", "layers_to_transform", "trainable_token_indices"):
    if config.get(key):
      raise PeftError(f"{file}: {key}={config[key]!r} is not supported")


def from_peft(config: dict, tensors: dict[str, np.ndarray], cfg: Config,
              fam: families.Family, file: str) -> tuple[dict, str, int]:  # noqa: C901
  """(the adapters as a moex params sub-tree at scale 1, lora.targets, rank) of a PEFT
  adapter for the model `cfg` (rank 0). Unknown keys and wrong shapes are refused."""
  check_config(config, file)
  fused = _table(cfg, fam, _layout(fam))
  hub = _table(cfg, fam, fam.hub_layout())
  by_weight = {}  # HF tensor name -> (moex path, Tensor) of both layouts
  for table in (fused, hub):
    for path, t in table.items():
      for name, _ in t.hub:
        by_weight.setdefault(name, (path, t))
  pairs: dict[str, dict[str, np.ndarray]] = {}
  for key, x in tensors.items():
    m = re.fullmatch(rf"{re.escape(_PREFIX)}(.+)\.lora_([AB])\.weight", key)
    if m is None:
      raise PeftError(f"{file}: unknown key {key} (moex reads LoRA's lora_A and lora_B)")
    pairs.setdefault(m.group(1), {})[m.group(2)] = np.asarray(x, np.float32)
  out: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # moex weight path -> (a, b)
  per_expert: dict[tuple, dict[int, tuple]] = {}
  for module, ab in sorted(pairs.items()):
    if set(ab) != {"A", "B"}:
      raise PeftError(f"{file}: {module} has lora_{''.join(ab)} without its pair")
    a, b = ab["A"], ab["B"]
    if module.endswith((".experts", ".experts.base_layer")):
      _fused_experts(module, _fused_kind(module, pairs, config), a, b, config, cfg, out, file)
      continue
    if module + ".weight" not in by_weight:
      raise PeftError(f"{file}: unknown key {_PREFIX}{module}.lora_A.weight: "
                      f"{fam.architecture} has no {module}.weight")
    path, t = by_weight[module + ".weight"]
    shape = dict(t.hub)[module + ".weight"]  # [out, in]
    r = a.shape[0]
    if a.shape != (r, shape[1]) or b.shape != (shape[0], r):
      raise PeftError(f"{file}: {module}: lora_A {a.shape} and lora_B {b.shape} do not fit "
                      f"its weight {shape} (want ({r}, {shape[1]}) and ({shape[0]}, {r}))")
    b = b * _scale(config, module, r)
    if t.stacked:  # the hub's per-expert layout: experts.<e>.<name>
      e = int(re.search(r"experts\.(\d+)\.", module).group(1))
      per_expert.setdefault(path, {})[e] = (a.T, b.T)
      continue
    w_in = t.shape[:len(t.shape) - _out_ndim(path)]
    out[path] = (a.T.reshape(w_in + (r,)), b.T.reshape((r,) + t.shape[len(w_in):]))
  for path, by_e in per_expert.items():
    e = cfg.moe.num_experts
    r = max(x[0].shape[1] for x in by_e.values())
    t = hub[path]
    a = np.zeros((e, t.shape[1], r), np.float32)
    b = np.zeros((e, r, t.shape[2]), np.float32)
    for i, (ai, bi) in by_e.items():
      a[i, :, :ai.shape[1]], b[i, :bi.shape[0]] = ai, bi
    out[path] = (a, b)
  return _as_tree(out, cfg)


def _out_ndim(path: tuple) -> int:
  """How many trailing axes of a moex weight are its output (q_DxHxA: 2; o_HxAxD: 1)."""
  name = path[-1]
  return 2 if name.startswith(("q_", "k_", "v_")) else 1


def _fused_kind(module: str, pairs: dict, config: dict) -> str:
  """Which fused tensor an experts module's LoRA adapts: with both targeted PEFT nests
  gate_up_proj's wrapper inside (experts.base_layer); with one, target_parameters says."""
  if module.endswith(".base_layer") or module + ".base_layer" in pairs:
    return "gate_up" if module.endswith(".base_layer") else "down"
  names = config.get("target_parameters") or []
  return "gate_up" if any(n.endswith("gate_up_proj") for n in names) and not any(
      n.endswith("down_proj") for n in names) else "down"


def _fused_experts(module, kind, a, b, config, cfg, out, file) -> None:
  """One fused experts tensor's adapter -> moex's per-expert gate and up, or down."""
  e, d, f = cfg.moe.num_experts, cfg.model.d_model, cfg.moe.d_expert
  layer = int(re.search(r"layers\.(\d+)\.", module).group(1))
  mod = module.removesuffix(".base_layer")
  if kind == "gate_up":
    param, width_in, width_out = f"{mod}.gate_up_proj", d, 2 * f
  else:
    param, width_in, width_out = f"{mod}.down_proj", f, d
  if a.shape[0] % e or a.shape[1] != width_in or b.shape != (width_out, a.shape[0]):
    raise PeftError(f"{file}: {module}: lora_A {a.shape} and lora_B {b.shape} do not fit "
                    f"{param} [{e}, {width_out}, {width_in}]")
  r = a.shape[0] // e
  a_e = a.reshape(e, r, width_in)  # [E, r, in]
  b_e = b.reshape(width_out, r, e).transpose(2, 0, 1) * _scale(config, param, r)  # [E, out, r]
  base = f"block_{layer}"
  if kind == "gate_up":
    for which, rows in (("gate_ExDxF", slice(0, f)), ("up_ExDxF", slice(f, 2 * f))):
      out[(base, "ffn", "experts", which)] = (a_e.transpose(0, 2, 1),
                                              b_e[:, rows].transpose(0, 2, 1))
  else:
    out[(base, "ffn", "experts", "down_ExFxD")] = (a_e.transpose(0, 2, 1),
                                                   b_e.transpose(0, 2, 1))


def _target(path: tuple) -> str:
  """The lora.targets name of a moex weight path."""
  stem = path[-1].split("_", 1)[0]
  if "experts" in path:
    return "experts"
  if "shared" in path:
    return "shared"
  return stem if stem in ("q", "k", "v", "o") else "dense"


def _as_tree(out: dict, cfg: Config) -> tuple[dict, str, int]:
  """The adapters as the moex model's sub-tree (every adapter of a target, missing ones
  zero) at one rank, their lora.targets and rank."""
  rank = max(a.shape[-1] for a, _ in out.values())
  targets = [t for t in LORA_TARGETS if t in {_target(p) for p in out}]
  tree: dict = {}
  weights = {leaf.path: leaf.shape for leaf in params_lib.tree(cfg)}
  for path, shape in weights.items():
    stem = path[-1].split("_", 1)[0]
    if _target(path) not in targets or path[-2:] == ("router", "kernel_DxE") or (
        stem not in ("q", "k", "v", "o", "gate", "up", "down")):
      continue
    a, b = out.get(path, (None, None))
    lead = 1 if "experts" in path else 0
    n_in = lead + (2 if stem == "o" else 1)
    if a is None:
      a = np.zeros(shape[:n_in] + (rank,), np.float32)
      b = np.zeros(shape[:lead] + (rank,) + shape[n_in:], np.float32)
    pad = rank - a.shape[-1]
    if pad:  # zero columns of A and rows of B: the same product
      a = np.concatenate([a, np.zeros(a.shape[:-1] + (pad,), np.float32)], -1)
      b = np.concatenate([b, np.zeros(b.shape[:lead] + (pad,) + b.shape[lead + 1:],
                                      np.float32)], lead)
    letters = path[-1].split("_", 1)[1].split("x")
    lx = "Ex" if lead else ""
    ins, outs = "x".join(letters[lead:n_in]), "x".join(letters[n_in:])
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[lora.PREFIX + stem] = {f"a_{lx}{ins}xr": a, f"b_{lx}rx{outs}": b}
  return tree, ",".join(targets), rank


def read(directory) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json, tensors) of a PEFT adapter directory (an epath.Path)."""
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
  cfg_file, weights = directory / CONFIG, directory / WEIGHTS
  for f in (cfg_file, weights):
    if not f.exists():
      raise PeftError(f"{directory}: no {f.name} (a PEFT adapter directory holds "
                      f"{CONFIG} and {WEIGHTS})")
  try:
    config = json.loads(cfg_file.read_text())
  except ValueError as e:
    raise PeftError(f"{cfg_file}: not JSON ({e})") from None
  try:
    tensors = load(weights.read_bytes())
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise PeftError(f"{weights}: not a safetensors file ({e})") from None
  return config, tensors
