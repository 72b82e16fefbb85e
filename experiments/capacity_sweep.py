"""Reference experiment 2: the capacity factor sweep (the analogue of Switch Table 1).

The tiny MoE (8 experts, top-2) trained with capacity factor 1.0, 1.25 and 2.0 and with
dropless dispatch; same data, same steps, evaluation always dropless. One command runs all
four and writes the table (tokens/s, dropped fraction, final eval loss) and figures:

  python -m moex.sweep --config=experiments/capacity_sweep.py --root=workdirs/cf_sweep

or one variant at a time:

  python -m moex.main --config=experiments/capacity_sweep.py:1.25 --workdir=workdirs/cf_sweep/1.25
"""

import ml_collections

from experiments import tiny

VARIANTS = ("1.0", "1.25", "2.0", "dropless")  # What `moex.sweep` runs, in this order.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: a training capacity factor ("1.0", "1.25", "2.0", ...) or "dropless"."""
  c = tiny.get_config()
  arg = arg or "1.25"
  if arg == "dropless":
    c.moe.dispatch = "dropless"
  else:
    try:
      c.moe.capacity_factor = float(arg)
    except ValueError:
      raise ValueError(f"capacity_sweep: variant {arg!r} is neither a number nor "
                       "'dropless'") from None
    c.moe.dispatch = "capacity"
  c.moe.min_capacity = 1  # Let the factor alone set the buffer (C = 64 at cf 1.0).
  c.train.eval_every = 100
  return c
