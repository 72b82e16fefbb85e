"""Reference experiment 5: a scaling ladder, dense and MoE, for `python -m moex.scaling fit`.

Four model sizes (d_model 32, 48, 64, 96; 2-4 layers; head width 16) x four token budgets
(TOKEN_STEPS steps of 16 x 128 bytes), each as a dense decoder (every FFN a SwiGLU of width
4 x d_model) and as an MoE with 8 experts of width 2 x d_model, top-2 (equal active FFN
width: K x d_expert = d_ff), dropless. Variants are named FAMILY_SIZE_STEPS, e.g.
"moe_s2_250". Every run has its own cosine schedule over its own length (Chinchilla's
protocol: one run per point, not snapshots of one long run). One command runs all 32
(resumes after an interruption), then the fit holds out each family's largest-compute run:

  python -m moex.sweep --config=experiments/ladder.py --root=workdirs/ladder --bench_steps=0 \
      --figure=workdirs/ladder/sweep.png
  python -m moex.scaling fit --runs=workdirs/ladder --holdout=largest \
      --out=docs/figures/ladder

One run by hand:

  python -m moex.main --config=experiments/ladder.py:moe_s1_125 --workdir=workdirs/l/moe_s1_125
"""

import ml_collections

from experiments import tiny

SIZES = ((32, 2), (48, 3), (64, 3), (96, 4))  # (d_model, num_layers) per size index
TOKEN_STEPS = (64, 125, 250, 500)  # train.steps per budget: 0.13M to 1.02M tokens
FAMILIES = ("dense", "moe")
VARIANTS = tuple(f"{f}_s{i}_{s}" for s in TOKEN_STEPS for i in range(len(SIZES))
                 for f in FAMILIES)  # cheapest budgets first, families side by side
HEAD_DIM = 16


def parse(arg: str) -> tuple[str, int, int]:
  """"moe_s2_250" -> ("moe", 2, 250); a name not in VARIANTS is a ValueError."""
  if arg not in VARIANTS:
    raise ValueError(f"ladder: unknown variant {arg!r} (FAMILY_sI_STEPS with FAMILY in "
                     f"{FAMILIES}, I < {len(SIZES)}, STEPS in {TOKEN_STEPS})")
  family, size, steps = arg.split("_")
  return family, int(size[1:]), int(steps)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: one of VARIANTS (default "moe_s0_125")."""
  family, size, steps = parse(arg or "moe_s0_125")
  d, layers = SIZES[size]
  c = tiny.get_config()
  m = c.model
  m.d_model, m.num_layers, m.head_dim = d, layers, HEAD_DIM
  m.num_heads = m.num_kv_heads = d // HEAD_DIM
  m.d_ff = 4 * d  # the dense FFN; the MoE's K x d_expert
  m.first_dense_layers = layers if family == "dense" else 0
  c.moe.num_experts, c.moe.top_k, c.moe.d_expert = 8, 2, 2 * d
  c.moe.dispatch = "dropless"
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.opt.warmup_steps = min(25, steps // 4)  # 25, and 16 in the shortest runs
  c.train.steps = steps
  c.train.eval_every = steps  # step 0 and the last: the fit reads the final eval
  c.train.log_every = 25
  c.train.checkpoint_every = steps
  c.train.keep_checkpoints = 1
  c.train.progress_seconds = 30.0
  return c
