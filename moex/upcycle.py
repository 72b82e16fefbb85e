"""Dense -> MoE upcycling, and MoE -> more experts: python -m moex.upcycle.

  python -m moex.upcycle --from=workdirs/dense --workdir=workdirs/up \
      --config=experiments/upcycling.py:copy --method=copy [--router_std=0.02] \
      [--noise_fraction=0.5 --noise_std=0] [--drop_ratio=0.5] [--config.seed=1]
  python -m moex.main --config=experiments/upcycling.py:copy --workdir=workdirs/up_run \
      --config.train.init_from=workdirs/up

reads a moex workdir (its config.json and params/ or newest checkpoint: a moex run or an
imported Llama/Mistral/MoE) and writes WORKDIR/params/ for the target --config: attention,
norms, embeddings and dense blocks copied, each block the target makes MoE built by
--method (moex/moe/upcycling.py METHODS; random draws seeded by the target's seed and the
block), then WORKDIR/upcycle.json (method, options, source) and last WORKDIR/config.json
(the resolved target config with train.init_from=WORKDIR): a directory without config.json
is an upcycle that did not finish (re-running the command replaces it). Train in another
workdir: a run inside WORKDIR would start from params/, which would then shadow its
checkpoints for any later init_from or export.

Refusals (one line `moex.upcycle: ...` naming the key or flag, exit status 2): target shapes
outside the FFN differ; a block MoE in the source but dense in the target; a method on a
block of the other kind; widths, expert counts or top-k that do not fit the method; shared
experts (dense methods); routers with which granular cannot equal the dense model; a float
flag that is not finite or out of range.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from moex import cli
from moex.moe import upcycling


def define_flags():
  """Flags only when run as a program (importing the module defines none); returns the
  --config holder."""
  flags.DEFINE_string("from", None, "The source workdir (dense for copy, noise, drop, "
                      "granular; MoE for expand).")
  flags.DEFINE_string("workdir", None, "The new directory: WORKDIR/params/ etc.")
  config = config_flags.DEFINE_config_file("config", None, "The target (MoE) config.",
                                           lock_config=False)
  flags.DEFINE_enum("method", upcycling.Options.method, list(upcycling.METHODS),
                    "How experts are initialized (moex/moe/upcycling.py METHODS).")
  for f in upcycling.option_fields():  # one float flag per method setting
    flags.DEFINE_float(f.name, f.default, f.metadata["help"])
  flags.mark_flags_as_required(["from", "workdir", "config"])
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  source, workdir = f["from"].value, f.workdir
  opts = upcycling.Options(f.method, **{o.name: f[o.name].value
                                        for o in upcycling.option_fields()})
  cfg, record = upcycling.upcycle(source, workdir, f.config, opts)
  same = "equal to the source" if record["step0_same_as_source"] else record["step0_note"]
  print(f"moex.upcycle: {opts.method}: {source} -> {workdir} "
        f"({len(cfg.model.moe_layers)} MoE blocks of {cfg.model.num_layers}, "
        f"{cfg.moe.num_experts} experts, top-{cfg.moe.top_k}; step 0: {same}); continue with "
        f"python -m moex.main --config=... --workdir=RUN --config.train.init_from={workdir}",
        flush=True)


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.upcycle")
