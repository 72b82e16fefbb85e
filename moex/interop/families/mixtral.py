"""Mixtral (MixtralForCausalLM): an MoE block in every layer, no q/k norms, renormalized top-k."""

from moex.config import ModelConfig, MoEConfig
from moex.interop.families import base


class Mixtral(base.Family):
  """The hub keeps experts as block_sparse_moe.experts.e.w1/w3/w2; transformers 5 holds them
  fused under mlp."""

  architecture = "MixtralForCausalLM"
  model_type = "mixtral"
  moe = True
  qk_norm = "none"
  moe_prefixes = ("block_sparse_moe", "mlp")
  expert_names = ("w1", "w3", "w2")
  fused = True
  num_experts_keys = ("num_local_experts",)
  renormalize_default = True  # Mixtral has no norm_topk_prob: it always renormalizes
  neutral = (("sliding_window", None), ("router_jitter_noise", 0.0))
  mapped = ("num_local_experts", "num_experts_per_tok")

  def check_export(self, model: ModelConfig, moe: MoEConfig, normalized: bool) -> None:
    super().check_export(model, moe, normalized)
    if not normalized:
      raise base.Unsupported("moe.renormalize: Mixtral renormalizes the top-k weights")

  def moe_to_hf(self, model: ModelConfig, moe: MoEConfig, normalized: bool) -> dict:
    return {"num_local_experts": moe.num_experts, "intermediate_size": moe.d_expert}


FAMILY = Mixtral()
