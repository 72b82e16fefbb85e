"""Reference experiment 3: the balancing ablation.

The tiny MoE (8 experts, top-2, capacity factor 1.25) trained three ways: no balancing
loss, the Switch load-balancing loss at 0.01, and DeepSeek-V3's auxiliary-loss-free bias
(`sigmoid_bias` router, no loss) at its default bias update rate 1e-3 and, as "aux_free_fast",
at 1e-2 (600 steps at 1e-3 move a bias by at most 0.6). The z-loss is off in all three so that only balancing
differs. Compare the needed capacity factor over time, dead experts and final eval loss:

  python -m moex.sweep --config=experiments/balancing.py --root=workdirs/balancing

or one variant at a time:

  python -m moex.main --config=experiments/balancing.py:switch --workdir=workdirs/balancing/switch
"""

import ml_collections

from experiments import tiny

VARIANTS = ("none", "switch", "aux_free", "aux_free_fast")  # What `moex.sweep` runs, in this order.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: "none", "switch" (default), "aux_free" or "aux_free_fast"."""
  c = tiny.get_config()
  arg = arg or "switch"
  c.moe.z_loss_weight = 0.0
  c.moe.seq_load_balance_weight = 0.0
  if arg == "none":
    c.moe.load_balance_weight = 0.0
  elif arg == "switch":
    c.moe.load_balance_weight = 1e-2
  elif arg in ("aux_free", "aux_free_fast"):
    c.moe.router = "sigmoid_bias"
    c.moe.load_balance_weight = 0.0
    if arg == "aux_free_fast":
      c.moe.bias_update_rate = 1e-2
  else:
    raise ValueError(f"balancing: unknown variant {arg!r} (none, switch, aux_free, "
                     "aux_free_fast)")
  c.train.eval_every = 100
  return c
