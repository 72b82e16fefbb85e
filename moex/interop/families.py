"""Hugging Face architecture families: config.json <-> moex config, and tensor <-> parameter.

Each family is a `Family`: which config.json keys it maps, which it only accepts at their
neutral value (anything moex does not implement is refused with one line naming the key),
and the tensor names of a block. moex parameters are [in, out] einsum layouts with split
head axes; Hugging Face's nn.Linear weights are [out, in]:

| moex parameter                    | Hugging Face tensor (per block N)                  |
|-----------------------------------|----------------------------------------------------|
| embed/table_VxD                   | model.embed_tokens.weight [V, D]                   |
| block_N/attn_norm/scale_D         | model.layers.N.input_layernorm.weight              |
| block_N/attn/q_DxHxA              | self_attn.q_proj.weight [H*A, D] (k, v: [J*A, D])  |
| block_N/attn/o_HxAxD              | self_attn.o_proj.weight [D, H*A]                   |
| block_N/attn/{q,k}_norm/scale_W   | self_attn.{q,k}_norm.weight (W: A, A or HA, JA)    |
| block_N/ffn_norm/scale_D          | post_attention_layernorm.weight                    |
| block_N/ffn/router/kernel_DxE     | <moe>.gate.weight [E, D]                           |
| block_N/ffn/experts/gate_ExDxF[e] | <moe>.experts.e.<gate>.weight [F, D] (up alike)    |
| block_N/ffn/experts/down_ExFxD[e] | <moe>.experts.e.<down>.weight [D, F]               |
| block_N/ffn/{gate,up}_DxF         | mlp.{gate,up}_proj.weight [F, D] (dense blocks)    |
| final_norm/scale_D, unembed_DxV   | model.norm.weight, lm_head.weight [V, D]           |

<moe> is `block_sparse_moe` with w1/w3/w2 (Mixtral on the hub) or `mlp` with
gate_proj/up_proj/down_proj (OLMoE, Qwen3-MoE, and Mixtral as transformers 5 holds it).
transformers 5's fused layout, `<moe>.experts.gate_up_proj [E, 2F, D]` (gate rows first)
and `<moe>.experts.down_proj [E, D, F]`, is read too; export writes the hub's per-expert one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from moex import errors
from moex.config import ModelConfig, MoEConfig


class Unsupported(ValueError, errors.Refusal):
  """A config.json key (or moex config key) the other side cannot express; one line."""


# Keys that describe the file or the tokenizer, not the function the network computes.
_METADATA = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "_name_or_path", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
    "initializer_range", "max_position_embeddings", "output_router_logits",
    "router_aux_loss_coef", "auto_map", "output_attentions", "output_hidden_states",
    "return_dict", "id2label", "label2id", "chunk_size_feed_forward", "is_encoder_decoder",
    "tokenizer_class", "max_window_layers", "_attn_implementation_autoset",
})

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclasses.dataclass(frozen=True)
class Family:
  architecture: str
  model_type: str
  moe: bool
  qk_norm: str  # moex model.qk_norm
  moe_prefix: tuple[str, ...] = ()  # candidates for <moe>, the hub's first
  expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
  num_experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts")
  expert_width_key: str = "intermediate_size"
  # Keys accepted only at these values (moex implements nothing else).
  neutral: tuple[tuple[str, Any], ...] = ()
  mapped: tuple[str, ...] = ()  # family-specific keys read by to_moex


_COMMON_MAPPED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps",
                  "rope_theta", "rope_parameters", "rope_scaling", "hidden_act",
                  "tie_word_embeddings", "attention_dropout")
_NO_BIAS = (("attention_bias", False), ("mlp_bias", False))

FAMILIES = {f.architecture: f for f in (
    Family("MixtralForCausalLM", "mixtral", moe=True, qk_norm="none",
           moe_prefix=("block_sparse_moe", "mlp"), expert_names=("w1", "w3", "w2"),
           num_experts_keys=("num_local_experts",),
           neutral=(("sliding_window", None), ("router_jitter_noise", 0.0)),
           mapped=("num_local_experts", "num_experts_per_tok")),
    Family("Qwen3MoeForCausalLM", "qwen3_moe", moe=True, qk_norm="head", moe_prefix=("mlp",),
           expert_width_key="moe_intermediate_size",
           neutral=_NO_BIAS + (("use_sliding_window", False), ("shared_expert_intermediate_size", 0)),
           mapped=("num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob",
                   "moe_intermediate_size", "mlp_only_layers", "decoder_sparse_step",
                   "sliding_window")),
    Family("OlmoeForCausalLM", "olmoe", moe=True, qk_norm="full", moe_prefix=("mlp",),
           neutral=_NO_BIAS + (("clip_qkv", None),),
           mapped=("num_experts", "num_experts_per_tok", "norm_topk_prob")),
    Family("LlamaForCausalLM", "llama", moe=False, qk_norm="none",
           neutral=_NO_BIAS + (("pretraining_tp", 1),)),
    Family("MistralForCausalLM", "mistral", moe=False, qk_norm="none",
           neutral=(("sliding_window", None),)),
)}

# Named in refusals: what these keys would need.
_REFUSED = {
    "quantization_config": "quantized weights (e.g. FP8 block scales) are not implemented",
    "q_lora_rank": "MLA attention is not implemented", "kv_lora_rank":
    "MLA attention is not implemented", "num_nextn_predict_layers":
    "multi-token-prediction layers are not implemented",
}


def family_of(hf: dict, file: str) -> Family:
  archs = hf.get("architectures") or []
  if len(archs) != 1 or archs[0] not in FAMILIES:
    raise Unsupported(f"{file}: architectures={archs!r} is not supported (moex reads "
                      f"{', '.join(FAMILIES)})")
  return FAMILIES[archs[0]]


def _rope_theta(hf: dict, file: str) -> float:
  """rope_theta from the hub's top-level key or transformers 5's rope_parameters."""
  scaling = hf.get("rope_scaling")
  if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "default":
    raise Unsupported(f"{file}: rope_scaling={scaling!r}: RoPE scaling is not implemented")
  params = hf.get("rope_parameters")
  if params is not None:
    if params.get("rope_type", "default") != "default":
      raise Unsupported(f"{file}: rope_parameters.rope_type={params['rope_type']!r}: only the "
                        "default (unscaled) RoPE is implemented")
    for k in sorted(set(params) - {"rope_type", "rope_theta"}):
      raise Unsupported(f"{file}: rope_parameters.{k}: RoPE scaling is not implemented")
    if "rope_theta" in params:
      return float(params["rope_theta"])
  return float(hf.get("rope_theta", 10_000.0))


def check_keys(hf: dict, fam: Family, file: str) -> None:
  """Refuses every key moex does not implement, or does not know."""
  for key, why in _REFUSED.items():
    if hf.get(key):
      raise Unsupported(f"{file}: {key}: {why}")
  neutral = dict(fam.neutral)
  for key, value in neutral.items():
    if key in hf and hf[key] not in (value, None if value in (0, 0.0, False) else value):
      raise Unsupported(f"{file}: {key}={hf[key]!r}: moex implements only {value!r} "
                        f"({fam.architecture})")
  if hf.get("hidden_act", "silu") != "silu":
    raise Unsupported(f"{file}: hidden_act={hf['hidden_act']!r}: moex's MLPs are SwiGLU (silu)")
  if hf.get("tie_word_embeddings", False):
    raise Unsupported(f"{file}: tie_word_embeddings=true: moex keeps the unembedding separate")
  if hf.get("attention_dropout", 0.0):
    raise Unsupported(f"{file}: attention_dropout={hf['attention_dropout']}: not implemented")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise Unsupported(f"{file}: partial_rotary_factor: only full-width RoPE is implemented")
  known = _METADATA | set(_COMMON_MAPPED) | set(neutral) | set(fam.mapped) | {
      "partial_rotary_factor"}
  for key in sorted(set(hf) - known):
    raise Unsupported(f"{file}: {key}: a {fam.architecture} key moex does not implement")


def _get(hf: dict, key: str, file: str):
  if key not in hf or hf[key] is None:
    raise Unsupported(f"{file}: {key}: missing")
  return hf[key]


def to_moex(hf: dict, file: str) -> tuple[Family, dict, dict]:
  """(family, model section, moe section) for moex from a config.json dict."""
  fam = family_of(hf, file)
  check_keys(hf, fam, file)
  g = lambda k: _get(hf, k, file)
  layers, heads = int(g("num_hidden_layers")), int(g("num_attention_heads"))
  head_dim = hf.get("head_dim") or g("hidden_size") // heads
  dtype = _DTYPES.get(str(hf.get("dtype", hf.get("torch_dtype", "float32"))), "float32")
  model = dict(
      vocab_size=int(g("vocab_size")), d_model=int(g("hidden_size")), num_layers=layers,
      num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(head_dim), d_ff=int(g("intermediate_size")), first_dense_layers=0,
      moe_every=1, dense_layers=(), rope_theta=_rope_theta(hf, file),
      norm_eps=float(g("rms_norm_eps")), init_std=float(hf.get("initializer_range", 0.02)),
      dtype=dtype, param_dtype=dtype, qk_norm=fam.qk_norm)
  moe: dict = {}
  if not fam.moe:
    model["first_dense_layers"] = layers  # every block dense
    return fam, model, moe
  experts = next((hf[k] for k in fam.num_experts_keys if hf.get(k)), None)
  if experts is None:
    raise Unsupported(f"{file}: {fam.num_experts_keys[0]}: missing")
  normalize = bool(hf.get("norm_topk_prob", fam.architecture == "MixtralForCausalLM"))
  moe = dict(num_experts=int(experts), top_k=int(g("num_experts_per_tok")),
             d_expert=int(g(fam.expert_width_key)),
             # softmax over all experts, top-k, optionally renormalized: HF's router, literally
             # (normalized, it equals topk_softmax: a softmax over the k chosen logits).
             router="softmax_topk", renormalize=normalize,
             dispatch="dropless", eval_capacity_factor=0.0,
             load_balance_weight=float(hf.get("router_aux_loss_coef", 0.0)), z_loss_weight=0.0)
  if fam.architecture == "Qwen3MoeForCausalLM":
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    model["first_dense_layers"], model["moe_every"] = step - 1, step  # (i + 1) % step == 0
    model["dense_layers"] = tuple(int(i) for i in hf.get("mlp_only_layers") or ())
  return fam, model, moe


def from_moex(model: ModelConfig, moe: MoEConfig, architecture: str | None = None) -> tuple[
    Family, dict]:
  """(family, config.json dict) for a moex model; refuses what the family cannot express."""
  def refuse(key, why):
    raise Unsupported(f"{key}: {why}")

  if architecture is None:
    if not model.moe_layers:
      architecture = "LlamaForCausalLM"
    else:
      architecture = {"none": "MixtralForCausalLM", "head": "Qwen3MoeForCausalLM",
                      "full": "OlmoeForCausalLM"}[model.qk_norm]
  if architecture not in FAMILIES:
    refuse("--architecture", f"{architecture!r} is not one of {', '.join(FAMILIES)}")
  fam = FAMILIES[architecture]
  if model.qk_norm != fam.qk_norm:
    refuse("model.qk_norm", f"{model.qk_norm!r}, but {architecture} has {fam.qk_norm!r}")
  hf = {"architectures": [architecture], "model_type": fam.model_type,
        "vocab_size": model.vocab_size, "hidden_size": model.d_model,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads, "head_dim": model.head_dim,
        "intermediate_size": model.d_ff, "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_dropout": 0.0, "initializer_range": model.init_std,
        "max_position_embeddings": 4096, "dtype": model.param_dtype}
  hf.update({k: v for k, v in fam.neutral if k != "shared_expert_intermediate_size"})
  if not fam.moe:
    if model.moe_layers:
      refuse("model.first_dense_layers", f"{architecture} is dense; the model has MoE blocks "
             f"{list(model.moe_layers)}")
    return fam, hf
  moe_layers = set(model.moe_layers)
  if fam.architecture != "Qwen3MoeForCausalLM" and len(moe_layers) != model.num_layers:
    refuse("model.first_dense_layers", f"{architecture} has an MoE block in every layer; "
           f"this model's dense blocks are {sorted(set(range(model.num_layers)) - moe_layers)}")
  if moe.router not in ("softmax_topk", "topk_softmax"):
    refuse("moe.router", f"{moe.router!r}: {architecture}'s router is a softmax then top-k")
  normalized = moe.router == "topk_softmax" or moe.renormalize
  if architecture == "MixtralForCausalLM" and not normalized:
    refuse("moe.renormalize", "Mixtral renormalizes the top-k weights")
  for key, neutral in (("num_shared_experts", 0), ("routed_scaling", 1.0)):
    if getattr(moe, key) != neutral:
      refuse(f"moe.{key}", f"{getattr(moe, key)!r}: {architecture} has {neutral!r}")
  hf.update({"num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.load_balance_weight})
  if architecture == "MixtralForCausalLM":
    hf.update({"num_local_experts": moe.num_experts, "intermediate_size": moe.d_expert})
  elif architecture == "OlmoeForCausalLM":
    hf.update({"num_experts": moe.num_experts, "intermediate_size": moe.d_expert,
               "norm_topk_prob": normalized})
  else:
    hf.update({"num_experts": moe.num_experts, "moe_intermediate_size": moe.d_expert,
               "norm_topk_prob": normalized, "decoder_sparse_step": 1,
               "mlp_only_layers": sorted(set(range(model.num_layers)) - moe_layers)})
  return fam, hf


# ---------------------------------------------------------------------------------------
# Tensors.


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One moex parameter and the Hugging Face tensor(s) it comes from.

  `read(reader, experts)` returns the moex-layout array; for a stacked expert parameter
  (`stacked`, axis 0 = E) only the experts in the slice `experts`. `write(array)` returns
  the hub tensors {name: array} of a moex-layout host array; `hub` lists their names and
  shapes in that order.
  """

  path: tuple[str, ...]
  shape: tuple[int, ...]
  hub: tuple[tuple[str, tuple[int, ...]], ...]
  read: Callable[[Any, slice | None], np.ndarray]
  write: Callable[[np.ndarray], dict[str, np.ndarray]]
  stacked: bool = False


def _linear(name: str, out_in: tuple[int, int], to_moex, to_hf):
  """A single nn.Linear weight [out, in], reshaped by to_moex / to_hf."""
  def read(reader, experts):
    del experts
    return to_moex(reader.get(name, out_in))
  return ((name, out_in),), read, lambda w: {name: np.ascontiguousarray(to_hf(w))}


def _plain(name: str, shape):
  return ((name, shape),), (lambda reader, experts: reader.get(name, shape)), (
      lambda w: {name: w})


def _experts(moe: str, names: tuple[str, str, str], e: int, d: int, f: int, which: int):
  """Expert weights stacked over E: which = 0 gate, 1 up (moex [E, D, F]), 2 down ([E, F, D])."""
  hub = [f"{moe}.experts.{i}.{names[which]}.weight" for i in range(e)]
  hub_shape = (d, f) if which == 2 else (f, d)
  fused_gu, fused_down = f"{moe}.experts.gate_up_proj", f"{moe}.experts.down_proj"

  def read(reader, experts):
    experts = experts or slice(0, e)
    if fused_gu in reader or fused_down in reader:  # transformers 5's fused layout
      if which == 2:
        w = reader.get(fused_down, (e, d, f), experts)  # [E, D, F]
      else:
        gu = reader.get(fused_gu, (e, 2 * f, d), experts)  # [E, 2F, D], gate rows first
        w = gu[:, :f] if which == 0 else gu[:, f:]
      return np.swapaxes(w, 1, 2)
    return np.stack([reader.get(hub[i], hub_shape).T for i in range(e)[experts]])

  def write(w):
    return {hub[i]: np.ascontiguousarray(w[i].T) for i in range(e)}

  return tuple((n, hub_shape) for n in hub), read, write


def tensors(fam: Family, model: ModelConfig, moe: MoEConfig, moe_prefix: str) -> list[Tensor]:
  """Every moex parameter of `model` with its Hugging Face source, in checkpoint order."""
  d, v, h, j, a = model.d_model, model.vocab_size, model.num_heads, model.num_kv_heads, \
      model.head_dim
  out: list[Tensor] = []

  def add(path, shape, hub_read_write, stacked=False):
    hub, read, write = hub_read_write
    out.append(Tensor(tuple(path.split("/")), tuple(shape), hub, read, write, stacked))

  add("embed/table_VxD", (v, d), _plain("model.embed_tokens.weight", (v, d)))
  for n in range(model.num_layers):
    p, b = f"model.layers.{n}.", f"block_{n}/"
    add(b + "attn_norm/scale_D", (d,), _plain(p + "input_layernorm.weight", (d,)))
    add(b + "attn/q_DxHxA", (d, h, a), _linear(
        p + "self_attn.q_proj.weight", (h * a, d),
        lambda w: w.T.reshape(d, h, a), lambda w: w.reshape(d, h * a).T))
    for kv in ("k", "v"):
      add(b + f"attn/{kv}_DxJxA", (d, j, a), _linear(
          p + f"self_attn.{kv}_proj.weight", (j * a, d),
          lambda w: w.T.reshape(d, j, a), lambda w: w.reshape(d, j * a).T))
    add(b + "attn/o_HxAxD", (h, a, d), _linear(
        p + "self_attn.o_proj.weight", (d, h * a),
        lambda w: w.T.reshape(h, a, d), lambda w: w.reshape(h * a, d).T))
    if model.qk_norm != "none":
      (qw, ql), (kw, kl) = ((a, "A"), (a, "A")) if model.qk_norm == "head" else (
          (h * a, "HA"), (j * a, "JA"))
      add(b + f"attn/q_norm/scale_{ql}", (qw,), _plain(p + "self_attn.q_norm.weight", (qw,)))
      add(b + f"attn/k_norm/scale_{kl}", (kw,), _plain(p + "self_attn.k_norm.weight", (kw,)))
    add(b + "ffn_norm/scale_D", (d,), _plain(p + "post_attention_layernorm.weight", (d,)))
    if model.is_moe_layer(n):
      e, f, m = moe.num_experts, moe.d_expert, p + moe_prefix
      add(b + "ffn/router/kernel_DxE", (d, e), _linear(
          m + ".gate.weight", (e, d), lambda w: w.T, lambda w: w.T))
      for which, name in enumerate(("gate_ExDxF", "up_ExDxF", "down_ExFxD")):
        shape = (e, f, d) if which == 2 else (e, d, f)
        add(b + "ffn/experts/" + name, shape, _experts(m, fam.expert_names, e, d, f, which),
            stacked=True)
    else:
      f = model.d_ff
      for name, hub, shape in (("gate_DxF", "gate_proj", (f, d)), ("up_DxF", "up_proj", (f, d)),
                               ("down_FxD", "down_proj", (d, f))):
        add(b + "ffn/" + name, shape[::-1], _linear(p + f"mlp.{hub}.weight", shape,
                                                    lambda w: w.T, lambda w: w.T))
  add("final_norm/scale_D", (d,), _plain("model.norm.weight", (d,)))
  add("unembed_DxV", (d, v), _linear("lm_head.weight", (v, d), lambda w: w.T, lambda w: w.T))
  return out


def moe_prefix(fam: Family, names: set[str], model: ModelConfig) -> str:
  """Which of the family's <moe> names the checkpoint uses (the hub's first)."""
  first = next((n for n in range(model.num_layers) if model.is_moe_layer(n)), None)
  if first is None:
    return fam.moe_prefix[0] if fam.moe_prefix else "mlp"
  for prefix in fam.moe_prefix:
    if f"model.layers.{first}.{prefix}.gate.weight" in names:
      return prefix
  return fam.moe_prefix[0]
