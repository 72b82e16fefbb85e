"""Tiny random transformers models, one per Hugging Face family moex reads (no download).

Shared by tests/interop_hf_test.py (logits against transformers) and
tests/interop_families_test.py (the tensor tables against the checkpoints); adding a family
adds its entry here.
"""

import jax
import numpy as np
import torch
import transformers

from experiments import tiny
from moex import config as config_lib
from moex.interop import hf
from moex.parallel import mesh as mesh_lib
from moex.train import state as state_lib

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.15, rms_norm_eps=1e-5,
              tie_word_embeddings=False, max_position_embeddings=1024, rope_theta=5000.0)
FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24)),
    # head_dim 12 != hidden / heads = 8; layer 1 dense (mlp_only_layers)
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                       intermediate_size=40, head_dim=12, norm_topk_prob=True,
                       mlp_only_layers=[1], num_hidden_layers=3)),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(num_experts=4, num_experts_per_tok=2, intermediate_size=24,
                   norm_topk_prob=False, pad_token_id=0, eos_token_id=1)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(intermediate_size=40)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(intermediate_size=40, sliding_window=None)),
}


def hf_model(name: str):
  """The family's tiny model, float32, eval mode, norms away from 1 (a misplaced norm shows)."""
  cls_cfg, cls_model, extra = FAMILIES[name]
  torch.manual_seed(0)
  model = cls_model(cls_cfg(**{**COMMON, **extra})).float().eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("norm.weight"):
        p.copy_(1 + 0.3 * torch.randn_like(p))
  return model


def load_imported(directory):
  """An HF directory read as moex.convert does, on tiny's other sections: (cfg, mesh,
  graphdef, params, buffers) with the buffers (the router bias) zero."""
  fam, _, model, moe = hf.moex_sections(str(directory))
  cd = tiny.get_config()
  cd.model.update(model)
  cd.moe.update(moe)
  cfg = config_lib.validate(cd)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, abs_params, abs_buffers = state_lib.abstract_variables(cfg, mesh)
  params = hf.load_params(str(directory), cfg, abs_params, fam)
  return cfg, mesh, graphdef, params, jax.tree.map(np.zeros_like, abs_buffers)
