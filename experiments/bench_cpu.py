"""CPU benchmark: an MoE decoder wide enough (D=512) for the 2-core CPU to be compute-bound.

  python -m moex.bench.train_step --config=experiments/bench_cpu.py
  python -m moex.bench.train_step --config=experiments/bench_cpu.py:dropless

Also trains like any experiment (python -m moex.main --config=experiments/bench_cpu.py
--workdir=...), but it is sized for timing, not for a good model.
"""

import ml_collections

from experiments import tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """tiny.py widened to D=512; `arg` = "dropless" switches the dispatch path."""
  c = tiny.get_config()
  c.model.d_model = 512  # Wide enough that matmuls, not overheads, dominate.
  c.model.num_layers = 2
  c.model.num_heads = 8
  c.model.num_kv_heads = 8
  c.model.head_dim = 64
  c.model.d_ff = 2048  # Dense layers (none here): K * d_expert, the same active width.
  c.moe.d_expert = 1024  # E=8 experts of 1024, top-2: 2048 active hidden units per token.
  c.moe.dispatch = "dropless" if arg == "dropless" else "capacity"
  c.data.seq_len = 256
  c.data.batch_size = 16  # 4096 tokens per step, the shape of moex.bench.moe_layer.
  c.train.steps = 100
  return c
