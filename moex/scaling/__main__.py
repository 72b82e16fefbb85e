"""Scaling laws from runs, and compute budgets planned with them.

  python -m moex.scaling fit --runs=workdirs/ladder [--holdout=largest|none] \
      [--out=docs/figures/ladder] [--bootstrap=200]
  python -m moex.scaling plan --flops=1e21 [--inference_tokens=1e12] [--memory_gb=80] \
      [--law=chinchilla|epoch|krajewski|ludziejewski|fitted:OUT.json[#NAME]] \
      [--write_config=experiments/planned.py --batch_size=512 --seq_len=2048]

fit writes OUT.json (every fitted law; --law=fitted:OUT.json plans with it), OUT.md and
the figures OUT_fit.png and OUT_isoflop.png. Every refusal (a bad flag, inf or nan among
the numbers, no runs, a bad law file) is one line `moex.scaling: ...`, exit status 2.
Interrupted, fit leaves the outputs it had written (re-run it); plan writes nothing but
--write_config.
"""

from __future__ import annotations

import sys

from absl import app, flags

from moex import cli, files

SUBCOMMANDS = ("fit", "plan")


def define_flags() -> None:
  """Defined only when run as a program (several moex commands imported into one process,
  e.g. pytest, would otherwise define --config/--workdir twice)."""
  flags.DEFINE_string("runs", None, "fit: a workdir, a sweep root or a glob of them.")
  flags.DEFINE_enum("holdout", "largest", ["largest", "none"], "fit: hold out each family's "
                    "largest-compute run and predict it.")
  flags.DEFINE_string("out", None, "fit: output prefix (default RUNS/scaling).")
  flags.DEFINE_integer("bootstrap", 200, "fit: bootstrap resamples for the 95% intervals.")
  flags.DEFINE_integer("seed", 0, "fit: bootstrap seed.")
  flags.DEFINE_integer("starts", 100, "fit: L-BFGS from this many best grid points (0 = all "
                       "4,500 of Hoffmann et al.'s grid).")
  flags.DEFINE_float("flops", None, "plan: training budget in FLOPs.")
  flags.DEFINE_float("inference_tokens", 0.0, "plan: tokens to be served afterwards.")
  flags.DEFINE_float("memory_gb", 0.0, "plan: memory for the parameters, GiB (0 = no limit).")
  flags.DEFINE_float("bytes_per_param", 2.0, "plan: bytes per stored parameter (bf16: 2).")
  flags.DEFINE_string("law", "ludziejewski", "plan: chinchilla, epoch, krajewski, "
                      "ludziejewski, or fitted:FILE[#NAME] (a fit's OUT.json).")
  flags.DEFINE_list("experts", ["1", "2", "4", "8", "16", "32", "64"],
                    "plan: candidate expansions E for the joint law.")
  flags.DEFINE_string("write_config", None, "plan: write the compute-optimal model as a moex "
                      "experiment file here.")
  flags.DEFINE_integer("batch_size", 512, "plan: sequences per step of the written config.")
  flags.DEFINE_integer("seq_len", 2048, "plan: tokens per sequence of the written config.")
  flags.DEFINE_integer("vocab_size", 32768, "plan: vocabulary of the written config.")


def run_fit(f) -> None:
  from moex.scaling import commands  # pylint: disable=g-import-not-at-top
  from moex.scaling.runs import ScalingError  # pylint: disable=g-import-not-at-top

  if not f.runs:
    raise ScalingError("fit: give --runs")
  for name in ("bootstrap", "starts"):
    if getattr(f, name) < 0:
      raise ScalingError(f"--{name}: must be >= 0, got {getattr(f, name)}")
  out = f.out or (f.runs.rstrip("/") + "/scaling" if "*" not in f.runs else "scaling")
  result = commands.fit_runs(f.runs, out, f.holdout, f.bootstrap, f.seed, f.starts)
  print(commands.markdown(result))
  print(f"moex.scaling: wrote {out}.json, {out}.md, " + ", ".join(result["figures"]))


def run_plan(f) -> None:
  from moex.scaling import commands  # pylint: disable=g-import-not-at-top
  from moex.scaling.runs import ScalingError  # pylint: disable=g-import-not-at-top

  if f.flops is None:
    raise ScalingError("plan: give --flops")
  for name in ("batch_size", "seq_len", "vocab_size"):
    if getattr(f, name) <= 0:
      raise ScalingError(f"--{name}: must be > 0, got {getattr(f, name)}")
  try:
    experts = tuple(float(e) for e in f.experts)
  except ValueError:
    raise ScalingError(f"--experts: not a list of numbers: {','.join(f.experts)}") from None
  text, best = commands.plan_budget(f.law, f.flops, f.inference_tokens, f.memory_gb,
                                    f.bytes_per_param, experts)
  print(text)
  if f.write_config:
    law = commands.load_law(f.law)
    source = commands.experiment_config(best, law, f.batch_size, f.seq_len, f.vocab_size,
                                        "python -m moex.scaling " + " ".join(sys.argv[1:]))
    files.write_text(f.write_config, source)  # renamed into place whole
    print(f"moex.scaling: wrote {f.write_config}")


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f"usage: python -m moex.scaling {{{'|'.join(SUBCOMMANDS)}}} --flags")
  (run_fit if argv[1] == "fit" else run_plan)(flags.FLAGS)


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.scaling")
