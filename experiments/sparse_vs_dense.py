"""Reference experiment 1: sparse beats dense at equal per-token compute (Mixtral, Switch).

The tiny MoE (8 experts of width 256, top-2) against the dense model with the same active
parameters (dense hidden size = K x expert hidden = 512), same data, same steps. One
command trains both, times their train steps back to back and writes the comparison table
and figure (eval loss curves, final bits per byte) to workdirs/svd/summary.md:

  python -m moex.sweep --config=experiments/sparse_vs_dense.py --root=workdirs/svd

or one at a time:

  python -m moex.main --config=experiments/sparse_vs_dense.py:moe --workdir=workdirs/svd/moe
  python -m moex.main --config=experiments/sparse_vs_dense.py:dense --workdir=workdirs/svd/dense
"""

import ml_collections

from experiments import tiny

VARIANTS = ("moe", "dense")  # What `moex.sweep` runs, in this order.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: "moe" (default) or "dense" (every layer a SwiGLU of width d_ff = K * d_expert)."""
  c = tiny.get_config()
  c.model.d_ff = c.moe.top_k * c.moe.d_expert  # equal active FFN width per token
  if arg == "dense":
    c.model.first_dense_layers = c.model.num_layers  # no MoE layer at all
  elif arg not in (None, "moe"):
    raise ValueError(f"sparse_vs_dense: unknown variant {arg!r} (moe, dense)")
  c.train.eval_every = 100  # a denser eval curve
  return c
