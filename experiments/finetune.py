"""Fine-tune an imported (or any moex-trained) model: its config.json, a fresh optimizer.

The whole flow on a small model made here (no download), about 10 minutes on 2 CPU cores:

  # 1. a small model to stand in for a downloaded one: train it, export it to transformers
  python -m moex.main --config=experiments/tiny.py --workdir=/tmp/moex/base \
      --config.train.steps=200 --config.moe.dispatch=dropless
  python -m moex.convert --to_hf=/tmp/hf/base --workdir=/tmp/moex/base
  # 2. import it as one imports Mixtral, OLMoE or Qwen3-MoE from the hub
  python -m moex.convert --from_hf=/tmp/hf/base --workdir=/tmp/moex/imported --tokenizer=byte
  # 3. fine-tune from the imported parameters (step 0 evaluates them as imported)
  python -m moex.main --config=experiments/finetune.py:/tmp/moex/imported \
      --workdir=/tmp/moex/finetuned
  # 4. the routing report of the fine-tuned run, then back to transformers
  python -m moex.report --workdir=/tmp/moex/finetuned
  python -m moex.convert --to_hf=/tmp/hf/finetuned --workdir=/tmp/moex/finetuned

The argument after the colon is the workdir to start from: its config.json gives the model,
MoE and mesh sections, the tokenizer is the workdir's (WORKDIR/tokenizer/ when present, as
moex.generate decides), and train.init_from points at it. Without an argument the config
fine-tunes the tiny default model's shape (set train.init_from yourself). Override
anything as usual, e.g. --config.data.source='/data/my_corpus/*.txt'.
"""

import ml_collections

from experiments import tiny
from moex import workdir as workdir_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Fine-tuning settings on top of workdir `arg`'s config (tiny's when None)."""
  c = tiny.get_config()
  if arg:
    wd = workdir_lib.Workdir(arg)
    source = wd.config()  # one line (WorkdirError) naming the file when missing or bad
    for section in ("model", "moe", "mesh"):
      c[section] = ml_collections.ConfigDict(source[section].to_dict())
    c.data.tokenizer = wd.tokenizer_spec(source)  # WORKDIR/tokenizer/ when there (one rule)
    c.train.init_from = arg  # parameters from there; optimizer and step start afresh
  # A short, gentle run: a tenth of the from-scratch peak, a short warmup, then cosine.
  c.opt.learning_rate = 3e-4
  c.opt.warmup_steps = 20
  c.opt.weight_decay = 0.0  # do not pull pretrained weights towards zero
  c.train.steps = 200
  c.train.eval_every = 50
  c.train.checkpoint_every = 100
  c.moe.dispatch = "dropless"  # the imported models were trained without drops
  return c
