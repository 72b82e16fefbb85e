"""Mixtral-8x7B-shaped MoE that fills one 80 GB GPU in bf16 (2 of Mixtral's 32 layers).

  python -m moex.bench.train_step --config=experiments/mixtral_gpu.py
  python -m moex.bench.train_step --config=experiments/mixtral_gpu.py:dropless

Layer widths are Mixtral's (D=4096, 32 query / 8 key-value heads of 128, 8 experts of
14336, top-2); depth is cut to 2 so float32 parameters (3.2B), AdamW state and bf16
activations of 4 x 4096 tokens fit in 80 GB. launch/gpu_bench.sh runs both dispatch paths
and both grouped-matmul backends in under 5 minutes.
"""

import ml_collections

from experiments import tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: "dropless" (ragged_dot), "dropless_chunked", or None for capacity 1.25."""
  c = tiny.get_config()
  c.model.vocab_size = 32_000  # Mixtral's vocabulary (the byte tokenizer uses 259 of it).
  c.model.d_model = 4096
  c.model.num_layers = 2
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.d_ff = 14_336
  c.model.rope_theta = 1e6
  c.model.dtype = "bfloat16"  # Compute in bf16; router math stays float32.
  c.model.param_dtype = "float32"
  c.moe.d_expert = 14_336
  c.moe.min_capacity = 0
  c.moe.dispatch = "dropless" if arg and arg.startswith("dropless") else "capacity"
  c.moe.grouped_matmul = "chunked" if arg == "dropless_chunked" else "auto"
  c.data.seq_len = 4096
  c.data.batch_size = 4
  c.train.steps = 20
  return c
