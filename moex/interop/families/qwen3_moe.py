"""Qwen3-MoE (Qwen3MoeForCausalLM): per-head q/k norms, MoE blocks every decoder_sparse_step
layers except mlp_only_layers (dense), expert width moe_intermediate_size."""

from moex.config import ModelConfig, MoEConfig
from moex.interop.families import base


class Qwen3Moe(base.Family):
  """Dense blocks where decoder_sparse_step or mlp_only_layers put them."""

  architecture = "Qwen3MoeForCausalLM"
  model_type = "qwen3_moe"
  moe = True
  qk_norm = "head"
  moe_prefixes = ("mlp",)
  fused = True
  expert_width_key = "moe_intermediate_size"
  neutral = base.NO_BIAS + (("use_sliding_window", False),
                            ("shared_expert_intermediate_size", 0))
  mapped = ("num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob",
            "moe_intermediate_size", "mlp_only_layers", "decoder_sparse_step", "sliding_window")

  def moe_from_hf(self, hf: dict, model: dict, moe: dict, file: str) -> None:
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    model["first_dense_layers"], model["moe_every"] = step - 1, step  # (i + 1) % step == 0
    model["dense_layers"] = tuple(int(i) for i in hf.get("mlp_only_layers") or ())

  def check_export(self, model: ModelConfig, moe: MoEConfig, normalized: bool) -> None:
    """Any pattern of dense blocks is expressible (mlp_only_layers)."""

  def moe_to_hf(self, model: ModelConfig, moe: MoEConfig, normalized: bool) -> dict:
    return {"num_experts": moe.num_experts, "moe_intermediate_size": moe.d_expert,
            "norm_topk_prob": normalized, "decoder_sparse_step": 1,
            "mlp_only_layers": sorted(set(range(model.num_layers)) - set(model.moe_layers))}


FAMILY = Qwen3Moe()
