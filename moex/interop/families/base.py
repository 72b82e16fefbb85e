"""What every Hugging Face family shares: the config.json keys of a decoder, the tensor table
of its blocks, and the hooks a family overrides (families/NAME.py, one class each).

moex parameters are [in, out] einsum layouts with split head axes; Hugging Face's nn.Linear
weights are [out, in]:

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

<moe> is one of the family's `moe_prefixes` (the hub's first). A `Layout` says which prefix a
checkpoint uses and whether its experts are per-expert (the hub's layout, which export
writes) or fused as transformers 5 holds them in memory (`fused`):
`<moe>.experts.gate_up_proj [E, 2F, D]` (gate rows first) and `<moe>.experts.down_proj
[E, D, F]`. tests/interop_families_test.py checks that the table of each family and layout
reads every element of a checkpoint into exactly one moex parameter.
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
METADATA = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "_name_or_path", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
    "initializer_range", "max_position_embeddings", "output_router_logits",
    "router_aux_loss_coef", "auto_map", "output_attentions", "output_hidden_states",
    "return_dict", "id2label", "label2id", "chunk_size_feed_forward", "is_encoder_decoder",
    "tokenizer_class", "max_window_layers", "_attn_implementation_autoset",
})
COMMON_MAPPED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps",
                 "rope_theta", "rope_parameters", "rope_scaling", "hidden_act",
                 "tie_word_embeddings", "attention_dropout", "partial_rotary_factor")
NO_BIAS = (("attention_bias", False), ("mlp_bias", False))
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# Named in refusals: what these keys would need.
_REFUSED = {
    "quantization_config": "quantized weights (e.g. FP8 block scales) are not implemented",
    "q_lora_rank": "MLA attention is not implemented", "kv_lora_rank":
    "MLA attention is not implemented", "num_nextn_predict_layers":
    "multi-token-prediction layers are not implemented",
}


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a checkpoint names its expert weights: the <moe> prefix, and fused or per-expert."""

  prefix: str
  fused: bool = False


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One moex parameter and the Hugging Face tensor(s) it comes from.

  `read(reader, experts)` returns the moex-layout array; for a stacked expert parameter
  (`stacked`, axis 0 = E) only the experts in the slice `experts`. `hub` lists the names and
  shapes of the tensors read (two fused parameters share `gate_up_proj`, each reading its
  half). `write(array)` returns the hub tensors {name: array} of a moex-layout host array
  (per-expert layouts only: export writes the hub's layout).
  """

  path: tuple[str, ...]
  shape: tuple[int, ...]
  hub: tuple[tuple[str, tuple[int, ...]], ...]
  read: Callable[[Any, slice | None], np.ndarray]
  write: Callable[[np.ndarray], dict[str, np.ndarray]] | None
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


def _experts(moe: str, names: tuple[str, str, str], e: int, d: int, f: int, which: int,
             fused: bool):
  """Expert weights stacked over E: which = 0 gate, 1 up (moex [E, D, F]), 2 down ([E, F, D])."""
  if fused:  # transformers 5's in-memory layout
    name, shape = ((f"{moe}.experts.down_proj", (e, d, f)) if which == 2 else
                   (f"{moe}.experts.gate_up_proj", (e, 2 * f, d)))

    def read_fused(reader, experts):
      w = reader.get(name, shape, experts or slice(0, e))  # [E, D, F] or [E, 2F, D]
      if which != 2:
        w = w[:, :f] if which == 0 else w[:, f:]  # gate rows first
      return np.swapaxes(w, 1, 2)

    return ((name, shape),), read_fused, None
  hub = [f"{moe}.experts.{i}.{names[which]}.weight" for i in range(e)]
  hub_shape = (d, f) if which == 2 else (f, d)

  def read(reader, experts):
    return np.stack([reader.get(hub[i], hub_shape).T for i in range(e)[experts or slice(0, e)]])

  def write(w):
    return {hub[i]: np.ascontiguousarray(w[i].T) for i in range(e)}

  return tuple((n, hub_shape) for n in hub), read, write


def _get(hf: dict, key: str, file: str):
  if key not in hf or hf[key] is None:
    raise Unsupported(f"{file}: {key}: missing")
  return hf[key]


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


class Family:
  """One Hugging Face architecture. A family sets the class attributes below and overrides
  the hooks (`moe_from_hf`, `check_export`, `moe_to_hf`) where it differs from a plain
  decoder with an MoE block (or a dense MLP) in every layer."""

  architecture: str = ""
  model_type: str = ""
  moe: bool = False
  qk_norm: str = "none"  # moex model.qk_norm
  moe_prefixes: tuple[str, ...] = ()  # candidates for <moe>, the hub's first
  expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
  fused: bool = False  # transformers 5 holds its experts fused (Layout.fused)
  num_experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts")
  expert_width_key: str = "intermediate_size"
  renormalize_default: bool = False  # norm_topk_prob when config.json omits it
  neutral: tuple[tuple[str, Any], ...] = ()  # keys accepted only at these values
  mapped: tuple[str, ...] = ()  # family-specific keys read by the hooks

  # -- hooks -------------------------------------------------------------------------------

  def moe_from_hf(self, hf: dict, model: dict, moe: dict, file: str) -> None:
    """Family-specific config.json keys into the model / moe sections (in place)."""

  def check_export(self, model: ModelConfig, moe: MoEConfig, normalized: bool) -> None:
    """Refuses (Unsupported) what this family cannot express; the default: MoE everywhere."""
    moe_layers = set(model.moe_layers)
    if len(moe_layers) != model.num_layers:
      raise Unsupported(
          f"model.first_dense_layers: {self.architecture} has an MoE block in every layer; "
          f"this model's dense blocks are {sorted(set(range(model.num_layers)) - moe_layers)}")

  def moe_to_hf(self, model: ModelConfig, moe: MoEConfig, normalized: bool) -> dict:
    """The family's MoE keys of config.json."""
    return {"num_experts": moe.num_experts, "intermediate_size": moe.d_expert,
            "norm_topk_prob": normalized}

  # -- config.json -> moex ---------------------------------------------------------------

  def check_keys(self, hf: dict, file: str) -> None:
    """Refuses every key moex does not implement, or does not know."""
    for key, why in _REFUSED.items():
      if hf.get(key):
        raise Unsupported(f"{file}: {key}: {why}")
    neutral = dict(self.neutral)
    for key, value in neutral.items():
      if key in hf and hf[key] not in (value, None if value in (0, 0.0, False) else value):
        raise Unsupported(f"{file}: {key}={hf[key]!r}: moex implements only {value!r} "
                          f"({self.architecture})")
    if hf.get("hidden_act", "silu") != "silu":
      raise Unsupported(f"{file}: hidden_act={hf['hidden_act']!r}: moex's MLPs are SwiGLU "
                        "(silu)")
    if hf.get("tie_word_embeddings", False):
      raise Unsupported(f"{file}: tie_word_embeddings=true: moex keeps the unembedding "
                        "separate")
    if hf.get("attention_dropout", 0.0):
      raise Unsupported(f"{file}: attention_dropout={hf['attention_dropout']}: not implemented")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
      raise Unsupported(f"{file}: partial_rotary_factor: only full-width RoPE is implemented")
    known = METADATA | set(COMMON_MAPPED) | set(neutral) | set(self.mapped)
    for key in sorted(set(hf) - known):
      raise Unsupported(f"{file}: {key}: a {self.architecture} key moex does not implement")

  def to_moex(self, hf: dict, file: str) -> tuple[dict, dict]:
    """(model section, moe section) for moex from a config.json dict."""
    self.check_keys(hf, file)
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
        dtype=dtype, param_dtype=dtype, qk_norm=self.qk_norm)
    if not self.moe:
      model["first_dense_layers"] = layers  # every block dense
      return model, {}
    experts = next((hf[k] for k in self.num_experts_keys if hf.get(k)), None)
    if experts is None:
      raise Unsupported(f"{file}: {self.num_experts_keys[0]}: missing")
    moe = dict(num_experts=int(experts), top_k=int(g("num_experts_per_tok")),
               d_expert=int(g(self.expert_width_key)),
               # softmax over all experts, top-k, optionally renormalized: HF's router,
               # literally (normalized, it equals topk_softmax: a softmax over the k chosen).
               router="softmax_topk",
               renormalize=bool(hf.get("norm_topk_prob", self.renormalize_default)),
               dispatch="dropless", eval_capacity_factor=0.0,
               load_balance_weight=float(hf.get("router_aux_loss_coef", 0.0)),
               z_loss_weight=0.0)
    self.moe_from_hf(hf, model, moe, file)
    return model, moe

  # -- moex -> config.json ---------------------------------------------------------------

  def from_moex(self, model: ModelConfig, moe: MoEConfig) -> dict:
    """The config.json dict of a moex model; refuses what the family cannot express."""
    arch = self.architecture
    if model.qk_norm != self.qk_norm:
      raise Unsupported(f"model.qk_norm: {model.qk_norm!r}, but {arch} has {self.qk_norm!r}")
    hf = {"architectures": [arch], "model_type": self.model_type,
          "vocab_size": model.vocab_size, "hidden_size": model.d_model,
          "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
          "num_key_value_heads": model.num_kv_heads, "head_dim": model.head_dim,
          "intermediate_size": model.d_ff, "rms_norm_eps": model.norm_eps,
          "rope_theta": model.rope_theta, "hidden_act": "silu", "tie_word_embeddings": False,
          "attention_dropout": 0.0, "initializer_range": model.init_std,
          "max_position_embeddings": 4096, "dtype": model.param_dtype}
    hf.update({k: v for k, v in self.neutral if k != "shared_expert_intermediate_size"})
    if not self.moe:
      if model.moe_layers:
        raise Unsupported(f"model.first_dense_layers: {arch} is dense; the model has MoE "
                          f"blocks {list(model.moe_layers)}")
      return hf
    if moe.router not in ("softmax_topk", "topk_softmax"):
      raise Unsupported(f"moe.router: {moe.router!r}: {arch}'s router is a softmax then top-k")
    normalized = moe.router == "topk_softmax" or moe.renormalize
    self.check_export(model, moe, normalized)
    for key, neutral in (("num_shared_experts", 0), ("routed_scaling", 1.0)):
      if getattr(moe, key) != neutral:
        raise Unsupported(f"moe.{key}: {getattr(moe, key)!r}: {arch} has {neutral!r}")
    hf.update({"num_experts_per_tok": moe.top_k,
               "router_aux_loss_coef": moe.load_balance_weight})
    hf.update(self.moe_to_hf(model, moe, normalized))
    return hf

  # -- tensors ---------------------------------------------------------------------------

  def hub_layout(self) -> Layout:
    """The layout export writes: the hub's per-expert one under its first prefix."""
    return Layout(self.moe_prefixes[0] if self.moe_prefixes else "mlp")

  def layout(self, names: set[str], model: ModelConfig) -> Layout:
    """The layout of a checkpoint holding tensors `names` (the hub's when unclear)."""
    first = next((n for n in range(model.num_layers) if model.is_moe_layer(n)), None)
    if first is None or not self.moe:
      return self.hub_layout()
    for prefix in self.moe_prefixes:
      m = f"model.layers.{first}.{prefix}."
      if self.fused and {m + "experts.gate_up_proj", m + "experts.down_proj"} & names:
        return Layout(prefix, fused=True)
      if m + "gate.weight" in names:
        return Layout(prefix)
    return self.hub_layout()

  def tensors(self, model: ModelConfig, moe: MoEConfig, layout: Layout) -> list[Tensor]:
    """Every moex parameter of `model` with its Hugging Face source, in checkpoint order."""
    d, v, h, j, a = (model.d_model, model.vocab_size, model.num_heads, model.num_kv_heads,
                     model.head_dim)
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
        e, f, m = moe.num_experts, moe.d_expert, p + layout.prefix
        add(b + "ffn/router/kernel_DxE", (d, e), _linear(
            m + ".gate.weight", (e, d), lambda w: w.T, lambda w: w.T))
        for which, name in enumerate(("gate_ExDxF", "up_ExDxF", "down_ExFxD")):
          shape = (e, f, d) if which == 2 else (e, d, f)
          add(b + "ffn/experts/" + name, shape,
              _experts(m, self.expert_names, e, d, f, which, layout.fused), stacked=True)
      else:
        f = model.d_ff
        for name, hub, shape in (("gate_DxF", "gate_proj", (f, d)),
                                 ("up_DxF", "up_proj", (f, d)),
                                 ("down_FxD", "down_proj", (d, f))):
          add(b + "ffn/" + name, shape[::-1], _linear(p + f"mlp.{hub}.weight", shape,
                                                      lambda w: w.T, lambda w: w.T))
    add("final_norm/scale_D", (d,), _plain("model.norm.weight", (d,)))
    add("unembed_DxV", (d, v), _linear("lm_head.weight", (v, d), lambda w: w.T, lambda w: w.T))
    return out
