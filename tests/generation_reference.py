"""Tiny Hugging Face models saved to disk and transformers' greedy generate on them: the
reference of the generation tests (tests/generation_engine_test.py, tests/generate_test.py)."""

import pathlib

import torch
import transformers

NEW = 12
HF_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, initializer_range=0.15, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, max_position_embeddings=256, rope_theta=5000.0)
HF_FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                       intermediate_size=40, head_dim=12, norm_topk_prob=True,
                       mlp_only_layers=[1])),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(intermediate_size=40)),
}


def _hub(name: str, directory: pathlib.Path, vocab_size: int = 96) -> pathlib.Path:
  cls_cfg, cls_model, extra = HF_FAMILIES[name]
  torch.manual_seed(0)
  cls_model(cls_cfg(vocab_size=vocab_size, **HF_COMMON, **extra)).float().save_pretrained(
      directory)
  return directory


def _hf_greedy(directory, prompt, eos_id=None):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, experts_implementation="eager",
      attn_implementation="eager").eval()
  model.generation_config.eos_token_id = eos_id
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt], dtype=torch.int64),
                         attention_mask=torch.ones((1, len(prompt)), dtype=torch.int64),
                         do_sample=False, max_new_tokens=NEW, eos_token_id=eos_id,
                         pad_token_id=0)
  tokens = out[0, len(prompt):].tolist()
  return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens
