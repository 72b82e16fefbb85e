"""OLMoE (OlmoeForCausalLM): q/k norms over the whole projection, an MoE block in every layer."""

from moex.interop.families import base


class Olmoe(base.Family):
  """The base family's MoE keys (num_experts, intermediate_size, norm_topk_prob)."""

  architecture = "OlmoeForCausalLM"
  model_type = "olmoe"
  moe = True
  qk_norm = "full"
  moe_prefixes = ("mlp",)
  fused = True
  neutral = base.NO_BIAS + (("clip_qkv", None),)
  mapped = ("num_experts", "num_experts_per_tok", "norm_topk_prob")


FAMILY = Olmoe()
