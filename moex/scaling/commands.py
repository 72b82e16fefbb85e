"""What `python -m moex.scaling fit` and `plan` do, as functions (the flags live in __main__).

fit_runs: reads the runs, fits the chinchilla law per family (dense; each MoE E and K) and,
when families differ in E, the joint law over all of them; holds out each family's largest-
compute run and predicts it; writes OUT.json (every law, usable as --law=fitted:OUT.json),
OUT.md (the table) and the figures OUT_fit.png and OUT_isoflop.png.

plan_budget: the compute-optimal and inference-aware plans under one law, as text, and
optionally a moex experiment config for the compute-optimal one (experiment_config).
"""

from __future__ import annotations

import json
import math
import os

from moex import files
from moex.scaling import fit as fit_lib
from moex.scaling import figures, forms, laws, plan
from moex.scaling.runs import RunPoint, ScalingError, read_runs

HOLDOUTS = ("largest", "none")
LAW_NAMES = tuple(laws.PUBLISHED)  # the --law names (plus fitted:FILE)


def families(points: list[RunPoint]) -> dict[str, list[RunPoint]]:
  out: dict[str, list[RunPoint]] = {}
  for p in sorted(points, key=lambda p: (p.experts, p.flops)):
    out.setdefault(p.family, []).append(p)
  return out


def split(groups: dict[str, list[RunPoint]], holdout: str
          ) -> tuple[dict[str, list[RunPoint]], dict[str, RunPoint]]:
  """(runs to fit on, the held-out run) per family: the largest model FLOPs is held out."""
  if holdout not in HOLDOUTS:
    raise ScalingError(f"--holdout: {holdout!r} is not one of {', '.join(HOLDOUTS)}")
  if holdout == "none":
    return groups, {}
  train, held = {}, {}
  for name, runs in groups.items():
    top = max(runs, key=lambda r: r.flops)
    held[name] = top
    train[name] = [r for r in runs if r is not top]
  return train, held


def law_json(f: fit_lib.Fit) -> dict:
  return {"name": f.law.name, "form": f.law.form, "coef": f.law.coef,
          "ci95": {k: list(v) for k, v in f.ci.items()}, "source": f.law.source,
          "ranges": {k: list(v) for k, v in f.law.ranges.items()},
          "objective": f.objective, "bootstrap": f.bootstrap,
          "runs": [r.workdir for r in f.runs]}


def law_from_json(d: dict) -> laws.Law:
  if d["form"] not in forms.FORMS:
    raise KeyError(f"form {d['form']!r}")
  return laws.Law(d["name"], d["form"], dict(d["coef"]), d["source"],
                  {k: tuple(v) for k, v in d["ranges"].items()})


def fit_runs(spec: str, out: str, holdout: str = "largest", bootstrap: int = 200,
             seed: int = 0, keep: int = 100) -> dict:
  """The fit command: returns what it writes to OUT.json."""
  groups = families(read_runs(spec))
  train, held = split(groups, holdout)
  fits = {}
  for name, runs in train.items():
    if len(runs) < 5:
      raise ScalingError(f"--runs={spec}: family {name} has {len(runs)} runs to fit on "
                         f"(after holding out {holdout}); the chinchilla law needs 5")
    fits[name] = fit_lib.fit(runs, name, bootstrap, seed, keep=keep)
  joint = None
  if len({r.expansion for runs in train.values() for r in runs}) > 1:
    joint = fit_lib.fit([r for runs in train.values() for r in runs], "joint", bootstrap, seed,
                        keep=keep)
  result = {"runs": spec, "holdout": holdout, "laws": {n: law_json(f) for n, f in fits.items()},
            "heldout": heldout(fits, joint, held)}
  if joint is not None:
    result["laws"]["joint"] = law_json(joint)
  result["main"] = "joint" if joint is not None else next(iter(fits))
  result["multiplier"] = multipliers(fits, joint, held)
  files.write_text(out + ".json", json.dumps(result, indent=1))
  result["figures"] = [figures.measured_vs_fitted(fits, held, out + "_fit.png"),
                       figures.isoflop(fits, 5, out + "_isoflop.png")]
  files.write_text(out + ".md", markdown(result))
  return result


def heldout(fits: dict[str, fit_lib.Fit], joint: fit_lib.Fit | None,
            held: dict[str, RunPoint]) -> dict[str, dict]:
  """Each held-out run: measured and predicted final loss, error in percent."""
  out = {}
  for name, h in held.items():
    row = {"workdir": h.workdir, "n_active": h.n_active, "tokens": h.tokens, "measured": h.loss}
    for label, f in (("family", fits[name]), ("joint", joint)):
      if f is not None:
        p = f.predict(h)
        row[label] = {"predicted": p, "error_pct": 100 * (p - h.loss) / h.loss}
    out[name] = row
  return out


def multipliers(fits: dict[str, fit_lib.Fit], joint: fit_lib.Fit | None,
                held: dict[str, RunPoint]) -> dict[str, dict]:
  """Per MoE family, at its held-out (or largest) run: the effective compute multiplier,
  dense compute reaching the MoE's loss over the MoE's compute (6 N D).

  family_laws / joint_law: both families on their fitted compute-optimal frontiers.
  same_size: from the run's measured loss, against the dense law at the run's own active
  parameters (the ladder's pairing: equal active widths): the tokens a dense model of that
  size needs to reach the loss, over the run's tokens."""
  dense = fits.get("dense")
  if dense is None:
    return {}
  out = {}
  for name, f in fits.items():
    if name == "dense":
      continue
    ref = held.get(name) or max(f.runs, key=lambda r: r.flops)
    c = 6 * ref.n_active * ref.tokens
    row = {"run": ref.workdir, "flops_6nd": c,
           "family_laws": plan.compute_multiplier(dense.law, f.law, c),
           "same_size": plan.tokens_for_loss(dense.law, ref.n_active, ref.loss, 1.0, 1.0)
           / ref.tokens}
    if joint is not None:
      row["joint_law"] = plan.compute_multiplier(joint.law, joint.law, c, 1.0, ref.expansion)
    out[name] = row
  return out


def _coef_cell(v: float, ci: tuple[float, float] | None) -> str:
  text = f"{v:.4g}"
  return text if ci is None else f"{text} [{ci[0]:.3g}, {ci[1]:.3g}]"


def markdown(result: dict) -> str:
  """The fit's table: every law's coefficients with 95% intervals, held-out predictions."""
  lines = [f"Fit of {result['runs']} (Huber {fit_lib.HUBER_DELTA:g} on log-loss, L-BFGS from a "
           "grid; [95% bootstrap interval over runs]):", ""]
  for name, law in result["laws"].items():
    keys = [k for k in law["coef"] if k not in ("e_start", "e_max")]
    lines += [f"**{name}** ({law['form']}, {len(law['runs'])} runs, bootstrap "
              f"{law['bootstrap']}):", "", "| " + " | ".join(keys) + " |",
              "|" + "---:|" * len(keys),
              "| " + " | ".join(_coef_cell(law["coef"][k], law["ci95"].get(k)) for k in keys)
              + " |", ""]
  if result["heldout"]:
    lines += ["Held-out runs (largest compute of each family):", "",
              "| family | run | measured | family law | error | joint law | error |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, row in result["heldout"].items():
      cells = [f"{row[k]['predicted']:.4f} | {row[k]['error_pct']:+.2f}%" if k in row else
               "– | –" for k in ("family", "joint")]
      lines.append(f"| {name} | {os.path.basename(row['workdir'])} | {row['measured']:.4f} | "
                   + " | ".join(cells) + " |")
    lines.append("")
  for name, row in result["multiplier"].items():
    joint = f", joint law {row['joint_law']:.2f}x" if "joint_law" in row else ""
    lines.append(f"Effective compute multiplier of {name} over dense at C = "
                 f"{row['flops_6nd']:.3g} (dense compute reaching its loss / its compute): "
                 f"compute-optimal frontiers of the family laws {row['family_laws']:.2f}x"
                 f"{joint}; {os.path.basename(row['run'])}'s measured loss against a dense "
                 f"model of its active size (dense law) {row['same_size']:.2f}x.")
  return "\n".join(lines) + "\n"


def load_law(name: str) -> laws.Law:
  """--law: a published law's name, fitted:FILE (the fit's main law) or fitted:FILE#NAME."""
  if name in laws.PUBLISHED:
    return laws.PUBLISHED[name]
  if not name.startswith("fitted:"):
    raise ScalingError(f"--law: {name!r} is not one of {', '.join(LAW_NAMES)} or fitted:FILE")
  path, _, which = name[len("fitted:"):].partition("#")
  try:
    with open(path) as f:
      result = json.load(f)
    entry = result["laws"][which or result["main"]]
    return law_from_json(entry)
  except (OSError, ValueError) as e:
    raise ScalingError(f"--law={name}: cannot read {path}: {e}") from None
  except (KeyError, TypeError) as e:
    raise ScalingError(f"--law={name}: {path} has no law {e} (not a moex.scaling fit?)") from None


def describe(p: plan.Allocation, law: laws.Law) -> str:
  moe = law.unit.describe(p.experts, p.granularity)
  return (f"N_active {p.n_active:.3g}, N_total {p.n_total:.3g}{moe}, D {p.tokens:.3g} tokens "
          f"({p.tokens / p.n_active:.1f}/param), loss {p.loss:.4f}, training {p.train_flops:.3g}"
          f" FLOPs" + (f" + inference {p.inference_flops:.3g} = {p.total_flops:.3g}"
                       if p.inference_flops else ""))


def _finite(flag: str, value: float, low: float, strict: bool) -> None:
  """Refuses a float flag that is inf, nan or below `low` (or at it, when `strict`)."""
  if not (math.isfinite(value) and (value > low if strict else value >= low)):
    raise ScalingError(f"--{flag}: must be a finite number {'>' if strict else '>='} "
                       f"{low:g}, got {value}")


def check_plan_flags(flops: float, inference_tokens: float, memory_gb: float,
                     bytes_per_param: float, experts: tuple[float, ...]) -> None:
  """Every float of the plan command finite and in range, refused in one line."""
  _finite("flops", flops, 0, strict=True)
  _finite("inference_tokens", inference_tokens, 0, strict=False)
  _finite("memory_gb", memory_gb, 0, strict=False)
  _finite("bytes_per_param", bytes_per_param, 0, strict=True)
  if not experts or not all(math.isfinite(e) and e >= 1 for e in experts):
    raise ScalingError(f"--experts: must be finite numbers >= 1, got "
                       f"{','.join(f'{e:g}' for e in experts)}")


def plan_budget(law_name: str, flops: float, inference_tokens: float = 0.0,
                memory_gb: float = 0.0, bytes_per_param: float = 2.0,
                experts: tuple[float, ...] = plan.EXPERTS) -> tuple[str, plan.Allocation]:
  """The plan command's text and the compute-optimal allocation."""
  check_plan_flags(flops, inference_tokens, memory_gb, bytes_per_param, experts)
  law = load_law(law_name)
  best, each = plan.compute_optimal(law, flops, experts, memory_gb * 2**30, bytes_per_param)
  lines = [f"law {law.name}: {law.source}", f"budget {flops:.3g} training FLOPs" +
           (f", memory {memory_gb:g} GiB at {bytes_per_param:g} bytes/parameter"
            if memory_gb else "")]
  if len(each) > 1:
    lines += [f"optimum per {law.unit.choice}:"]
    lines += ["  " + describe(p, law) for p in each]
  lines.append("compute-optimal: " + describe(plan.with_inference(law, best, inference_tokens),
                                              law))
  lines += plan.range_warnings(law, best)
  if inference_tokens > 0:
    aware = plan.inference_aware(law, best, inference_tokens)
    cost = plan.with_inference(law, best, inference_tokens).total_flops
    lines.append(f"inference-aware ({inference_tokens:.3g} tokens served, same loss): "
                 + describe(aware, law) + f"; {100 * (1 - aware.total_flops / cost):.1f}% fewer "
                 "total FLOPs")
    lines += plan.range_warnings(law, aware)
  return "\n".join(lines), best


def experiment_config(p: plan.Allocation, law: laws.Law, batch_size: int, seq_len: int,
                      vocab_size: int, command: str) -> str:
  """A moex experiment file training the plan: widths and depth for its active parameters
  (moex's count), steps for the batch, experts for its E (top-1) or G (top-G of 64 G)."""
  from moex.scaling import shapes  # imports jax (params.counts): only when writing a config

  shape = shapes.shape_for(p, law, vocab_size, seq_len)
  steps = max(1, math.ceil(p.tokens / (batch_size * seq_len)))
  return shapes.render(shape, steps, batch_size, seq_len, vocab_size, command, p)

