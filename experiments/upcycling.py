"""Reference experiment 4: dense -> MoE upcycling at equal training compute.

A dense tiny model (4 layers, D=128, SwiGLU width 256) trains BASE_STEPS steps ("dense").
The same extra compute -- EXTRA_DENSE_STEPS dense steps' worth of model FLOPs
(moex.train.flops) -- is then spent three ways: continuing the dense model
("dense_continue"), upcycling it to 8 experts of width 256, top-2 ("copy": every expert the
dense FFN, Komatsuzaki et al. 2022; "drop": Drop-Upcycling with r = 0.5, Nakamura et al.
2025) and continuing as an MoE, or training that MoE from scratch for the total compute
("scratch"). Continuations start with a fresh AdamW and the same short schedule; all MoE
runs are dropless. One command runs every variant and seed (resumes after an interruption),
upcycling before the upcycled variants train:

  python -m moex.sweep --config=experiments/upcycling.py --root=workdirs/upcycling \
      --seeds=1,2 --figure=docs/figures/upcycling.png

A longer budget (EXTRA_DENSE_STEPS x 3 = +150%; the dense base is shared, so link it):

  mkdir -p workdirs/upcycling_x3/seed1 workdirs/upcycling_x3/seed2
  ln -s $PWD/workdirs/upcycling/dense workdirs/upcycling_x3/dense   # and seed1/, seed2/
  python -m moex.sweep --config=experiments/upcycling.py --root=workdirs/upcycling_x3 \
      --variants=dense,dense_continue_x3,copy_x3,scratch_x3 --seeds=1,2 \
      --figure=docs/figures/upcycling_x3.png

or by hand (seed 0):

  python -m moex.main --config=experiments/upcycling.py:dense --workdir=workdirs/up/dense
  python -m moex.upcycle --from=workdirs/up/dense --workdir=workdirs/up/copy.upcycled \
      --config=experiments/upcycling.py:copy --method=copy
  python -m moex.main --config=experiments/upcycling.py:copy --workdir=workdirs/up/copy \
      --config.train.init_from=workdirs/up/copy.upcycled
"""

import ml_collections

from experiments import tiny
from moex import config as config_lib
from moex.train import flops

VARIANTS = ("dense", "dense_continue", "copy", "drop", "scratch")  # moex.sweep's order
LONGER = ("dense_continue_x3", "copy_x3", "scratch_x3")  # the same with 3x the extra compute
INIT_FROM = {"dense_continue": "dense", "copy": "dense", "drop": "dense",  # starts from
             "dense_continue_x3": "dense", "copy_x3": "dense"}
UPCYCLE = {"copy": ("--method=copy",), "drop": ("--method=drop", "--drop_ratio=0.5"),
           "copy_x3": ("--method=copy",)}
BASELINE = ("dense_continue", "dense_continue_x3")  # the paired differences subtract it
BASE_STEPS = 300  # the dense model's own training
EXTRA_DENSE_STEPS = 150  # the extra compute, in dense steps (+50%, as Komatsuzaki et al.)
_VOCAB = 259  # the byte tokenizer's (FLOPs need the vocabulary size)


def _model(c: ml_collections.ConfigDict, moe: bool) -> None:
  c.model.d_ff = 256  # the dense FFN; the MoE's experts are copies of it
  c.model.first_dense_layers = 0 if moe else c.model.num_layers
  c.moe.num_experts = 8
  c.moe.top_k = 2
  c.moe.d_expert = c.model.d_ff
  c.moe.dispatch = "dropless"  # the upcycled model equals the dense one at step 0


def _flops_per_step(c: ml_collections.ConfigDict) -> float:
  cfg = config_lib.validate(c, vocab_size=_VOCAB)
  return flops.train_flops_per_token(cfg) * c.data.batch_size * c.data.seq_len


def _continuation(c: ml_collections.ConfigDict) -> None:
  """The schedule every continuation uses (fresh optimizer): short warmup, lower peak."""
  c.opt.learning_rate = 1e-3
  c.opt.warmup_steps = 20


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: one of VARIANTS or LONGER (default "dense")."""
  arg = arg or "dense"
  if arg not in VARIANTS + LONGER:
    raise ValueError(f"upcycling: unknown variant {arg!r} ({', '.join(VARIANTS + LONGER)})")
  extra = EXTRA_DENSE_STEPS * (3 if arg.endswith("_x3") else 1)
  arg = arg.removesuffix("_x3")
  c = tiny.get_config()
  c.data.seq_len = 128  # 16 x 128 tokens per step: the 15 runs fit in about an hour on 2 cores
  c.train.eval_every = 50
  c.train.checkpoint_every = 100
  dense_step = _flops_per_step(_with(c, moe=False))
  _model(c, moe=arg in ("copy", "drop", "scratch"))
  ratio = dense_step / _flops_per_step(c)  # MoE steps per dense step at equal FLOPs
  if arg == "dense":
    c.train.steps = BASE_STEPS
  elif arg == "dense_continue":
    c.train.steps = extra
  elif arg == "scratch":
    c.train.steps = round((BASE_STEPS + extra) * ratio)
  else:
    c.train.steps = round(extra * ratio)
  if arg in INIT_FROM:
    _continuation(c)
  return c


def _with(c: ml_collections.ConfigDict, moe: bool) -> ml_collections.ConfigDict:
  c = c.copy_and_resolve_references()
  _model(c, moe)
  return c
