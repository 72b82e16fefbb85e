"""Tiny Hugging Face models saved to disk and transformers' greedy generate on them: the
reference of the generation tests (tests/generation_engine_test.py, tests/generate_test.py)."""

import pathlib

import torch
import transformers
from interop_tiny import COMMON, FAMILIES

NEW = 12
# interop_tiny's families, with what generation needs: qwen3_moe with 8 experts and 2 layers
# (a decode step has T*K < E: the gather path), a 256-column position table.
OVERRIDES = {"mixtral": {}, "qwen3_moe": dict(num_experts=8, num_hidden_layers=2),
             "llama": {}}


def _hub(name: str, directory: pathlib.Path, vocab_size: int = 96) -> pathlib.Path:
  cls_cfg, cls_model, extra = FAMILIES[name]
  torch.manual_seed(0)
  kwargs = {**COMMON, **extra, **OVERRIDES[name], "vocab_size": vocab_size,
            "max_position_embeddings": 256}
  cls_model(cls_cfg(**kwargs)).float().save_pretrained(directory)
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
