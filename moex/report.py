"""Routing-health report of a workdir: loss, expert load, drops, capacity, router entropy.

  python -m moex.report --workdir=workdirs/tiny [--out=workdirs/tiny/report] \
      [--target_drop=0.01] [--recent=20]

Reads metrics.jsonl, moe_stats.jsonl and config.json of a finished or still-running run
(bad or torn lines are skipped with a warning) and writes PNG figures and OUT/report.md.

Capacity recommendation. Capacity is per sequence, so the drop at a factor cf depends on
every (sequence, expert) load. Records carry `sequence_load_hist`: those pairs binned by
the factor each would need (bins of 0.05), with their loads summed per bin. With
C = ceil(cf * L * K / E) rows per sequence,
  drop(cf) = sum_b max(0, load_sum_b - count_b * C) / sum_b load_sum_b,
exact up to the bin width. Records written before that field existed fall back to the
capacity pooled over the window (drop = sum_e max(0, load_e - cf * mean_load) / sum load),
which ignores per-sequence imbalance and is far too optimistic (measured: 1-2% estimated
where 6-8% were dropped); the table says which estimate it used. Per layer, the
recommendation is the smallest cf on a 1.0..8.0 grid (step 0.05) with drop(cf) <= target in
at least 95% of the recent train windows; the max `needed_capacity_factor` of the same
windows is the exact dropless bound. Expert buffer rows and expert FLOPs scale linearly
with cf, so the cost relative to the current setting is recommended / current cf.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable

import matplotlib
import numpy as np
from absl import app, flags, logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CF_GRID = np.round(np.arange(100, 801, 5) / 100, 2)  # 1.0, 1.05, ..., 8.0
WINDOW_QUANTILE = 0.95  # the share of recent windows the recommendation must satisfy
PROGRESS_LINES = 100_000  # log progress every this many lines read
MAX_LEGEND_LAYERS = 12  # more layers than this get a colour bar instead of a legend


@dataclasses.dataclass
class Run:
  """What a workdir holds: metric lines, MoE stat lines (deduplicated) and the config."""

  metrics: list[dict]
  moe: list[dict]
  config: dict


# Reading.


def read_jsonl(path: str) -> list[dict]:
  """The JSON objects of a file, skipping (with a warning) lines that do not parse."""
  if not os.path.exists(path):
    logging.warning("%s: missing", path)
    return []
  out = []
  with open(path) as f:
    for n, line in enumerate(f, start=1):
      if n % PROGRESS_LINES == 0:
        logging.info("%s: read %d lines", path, n)
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except ValueError:
        rec = None
      if not isinstance(rec, dict) or "step" not in rec or "split" not in rec:
        torn = "" if line.endswith("\n") else " (torn last line: still being written?)"
        logging.warning("%s:%d: skipping a bad JSON line%s", path, n, torn)
        continue
      out.append(rec)
  logging.info("%s: %d records", path, len(out))
  return out


def _dedupe(records: list[dict], key: Callable[[dict], tuple]) -> list[dict]:
  """Keeps the last record per key, sorted by step (a killed and resumed run may repeat)."""
  return sorted({key(r): r for r in records}.values(), key=lambda r: r["step"])


def load_run(workdir: str) -> Run:
  metrics = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  moe = [r for r in read_jsonl(os.path.join(workdir, "moe_stats.jsonl"))
         if "layer" in r and isinstance(r.get("expert_load"), list)]
  config = {}
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    logging.warning("config.json not read: %s", e)
  return Run(metrics=_dedupe(metrics, lambda r: (r["step"], r["split"])),
             moe=_dedupe(moe, lambda r: (r["step"], r["split"], r["layer"])), config=config)


def _num(v) -> float:
  """A float for plotting: null is NaN; the writer stores NaN/Inf as strings."""
  try:
    return float(v)
  except (TypeError, ValueError):
    return math.nan


def _nan_reduce(fn, values: list[float]) -> float:
  """fn (np.nanmax, np.nanmean) ignoring missing values; NaN when all are missing."""
  vals = np.asarray(values, np.float64)
  return float(fn(vals)) if np.isfinite(vals).any() else math.nan


def _split(records: list[dict], split: str) -> list[dict]:
  return [r for r in records if r["split"] == split]


def _by_layer(records: list[dict]) -> dict[int, list[dict]]:
  out: dict[int, list[dict]] = {}
  for r in records:
    out.setdefault(r["layer"], []).append(r)
  return dict(sorted(out.items()))


def _series(records: list[dict], field: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one field, leaving out records that lack it."""
  rs = [r for r in records if field in r]
  return (np.array([r["step"] for r in rs]), np.array([_num(r[field]) for r in rs]))


def _share(load: list[int]) -> np.ndarray:
  load_E = np.asarray(load, np.float64)
  total = load_E.sum()
  return load_E / total if total > 0 else load_E


# Capacity recommendation.


def pooled_drop(load_WxE: np.ndarray, cf: np.ndarray) -> np.ndarray:
  """drop(cf) of each window for each factor: [G] factors x [W, E] loads -> [G, W]."""
  load_WxE = np.asarray(load_WxE, np.float64)
  mean_W = load_WxE.mean(axis=-1)
  cap_GxW = np.asarray(cf, np.float64)[:, None] * mean_W[None]
  over_GxW = np.maximum(0.0, load_WxE[None] - cap_GxW[..., None]).sum(-1)
  total_W = load_WxE.sum(-1)
  return np.where(total_W > 0, over_GxW / np.maximum(total_W, 1), 0.0)


def histogram_drop(hists: list[dict], cf: np.ndarray, unit: float,
                   min_capacity: int = 0) -> np.ndarray:
  """drop(cf) of each window from its per-sequence load histogram: [G, W].

  `unit` = L * K / E, the load of one sequence's expert at capacity factor 1.
  """
  cap_G = np.maximum(np.ceil(np.asarray(cf, np.float64) * unit - 1e-9), min_capacity)
  out = np.zeros((len(cap_G), len(hists)))
  for w, h in enumerate(hists):
    count_B = np.asarray(h["counts"], np.float64)
    load_B = np.asarray(h["load_sums"], np.float64)
    total = load_B.sum()
    if total > 0:
      over_GxB = np.maximum(0.0, load_B[None] - count_B[None] * cap_G[:, None])
      out[:, w] = over_GxB.sum(-1) / total
  return out


def _first_ok(drop_GxW: np.ndarray, target: float) -> float | None:
  ok_GxW = drop_GxW <= target + 1e-12
  good = np.flatnonzero(ok_GxW.mean(axis=1) >= WINDOW_QUANTILE - 1e-12)
  return float(CF_GRID[good[0]]) if good.size else None


def smallest_cf(load_WxE: np.ndarray, target: float) -> float | None:
  """Smallest grid cf with drop <= target in >= 95% of the windows (None: above 8.0)."""
  ok_GxW = pooled_drop(load_WxE, CF_GRID) <= target + 1e-12
  good = np.flatnonzero(ok_GxW.mean(axis=1) >= WINDOW_QUANTILE - 1e-12)
  return float(CF_GRID[good[0]]) if good.size else None


def current_cf(run: Run) -> float | None:
  """The training capacity factor: latest train record, else config.json (None: dropless)."""
  train = _split(run.moe, "train")
  if train:
    return train[-1].get("capacity_factor")
  moe_cfg = run.config.get("moe", {})
  if moe_cfg.get("dispatch", "capacity") != "capacity":
    return None
  return moe_cfg.get("capacity_factor")


def recommend(run: Run, target: float, recent: int) -> list[dict]:
  """One row per layer: recommended cf, max needed cf, cost relative to the current cf."""
  cf_now = current_cf(run)
  rows = []
  for layer, rs in _by_layer(_split(run.moe, "train")).items():
    rs = rs[-recent:]
    load_WxE = np.array([r["expert_load"] for r in rs])
    unit = _unit(run, rs[-1])
    exact = unit is not None and all("sequence_load_hist" in r for r in rs)
    if exact:
      min_cap = int(run.config.get("moe", {}).get("min_capacity", 0) or 0)
      drop = lambda cfs: histogram_drop([r["sequence_load_hist"] for r in rs], cfs, unit,
                                        min_cap)
      cf = _first_ok(drop(CF_GRID), target)
    else:
      drop = lambda cfs: pooled_drop(load_WxE, cfs)
      cf = smallest_cf(load_WxE, target)
    needed = [_num(r.get("needed_capacity_factor")) for r in rs]
    rows.append({
        "layer": layer,
        "windows": len(rs),
        "recommended_cf": cf,
        "max_needed_cf": _nan_reduce(np.nanmax, needed),
        "current_cf": cf_now,
        "cost": cf / cf_now if (cf is not None and cf_now) else None,
        "recent_dropped": _nan_reduce(np.nanmean, [_num(r.get("dropped_fraction")) for r in rs]),
        # The estimate's own value at the current factor, to compare with the actual drop.
        "estimate": "per-sequence histogram" if exact else "pooled (optimistic)",
        "pooled_dropped": (float(drop(np.array([cf_now])).mean()) if cf_now else None),
    })
  return rows


def _unit(run: Run, record: dict) -> float | None:
  """L * K / E: a sequence's per-expert load at capacity factor 1."""
  seq_len = run.config.get("data", {}).get("seq_len")
  if not seq_len:
    return None
  return seq_len * record["top_k"] / record["num_experts"]


# Summary.


def _last(records: list[dict], split: str, field: str) -> float | None:
  vals = [r[field] for r in _split(records, split) if r.get(field) is not None]
  return _num(vals[-1]) if vals else None


def latest_train(run: Run) -> dict[int, dict]:
  """The latest train record of each layer."""
  return {layer: rs[-1] for layer, rs in _by_layer(_split(run.moe, "train")).items()}


def dead_experts(run: Run) -> dict[int, list[int]]:
  """Experts with zero load in the latest train window, per layer (only layers with any)."""
  out = {}
  for layer, r in latest_train(run).items():
    dead = [e for e, n in enumerate(r["expert_load"]) if n == 0]
    if dead:
      out[layer] = dead
  return out


def summary(run: Run, recent: int) -> dict:
  """The numbers at the top of the page (None where the workdir lacks them)."""
  steps = [r["step"] for r in run.metrics + run.moe]
  moe_cfg = run.config.get("moe", {})
  latest = latest_train(run)
  any_rec = next(iter(latest.values()), run.moe[-1] if run.moe else {})
  recent_drop = [_num(r.get("dropped_fraction"))
                 for rs in _by_layer(_split(run.moe, "train")).values() for r in rs[-recent:]]
  overload = [_num(r["overload_factor"]) for r in latest.values() if "overload_factor" in r]
  dispatch = {r["split"]: r.get("dispatch") for r in run.moe}
  return {
      "steps": max(steps) if steps else None,
      "final_train_loss": _last(run.metrics, "train", "loss"),
      "final_eval_bpb": _last(run.metrics, "eval", "bits_per_byte"),
      "moe_layers": sorted({r["layer"] for r in run.moe}),
      "num_experts": any_rec.get("num_experts", moe_cfg.get("num_experts")),
      "top_k": any_rec.get("top_k", moe_cfg.get("top_k")),
      "dispatch": dispatch or {"train": moe_cfg.get("dispatch")},
      "current_cf": current_cf(run),
      "recent_dropped": _nan_reduce(np.nanmean, recent_drop),
      "dead_experts": dead_experts(run),
      "max_overload_factor": max(overload) if overload else None,
  }


# Figures: one function each; each returns its file name, or None when there is no data.


def _figure(nrows: int = 1, ncols: int = 1, width: float = 7.0, height: float = 3.6):
  fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes.ravel()


def _save(fig: Figure, out: str, name: str) -> str:
  fig.savefig(os.path.join(out, name), dpi=110)
  logging.info("wrote %s", os.path.join(out, name))
  return name


def _layer_colors(layers: list[int]) -> dict[int, tuple]:
  cmap = matplotlib.colormaps["viridis"]
  n = max(len(layers) - 1, 1)
  return {layer: cmap(i / n) for i, layer in enumerate(layers)}


def _layer_legend(fig: Figure, ax, layers: list[int]) -> None:
  """A legend for a few layers, a colour bar from first to last layer for many."""
  if len(layers) <= MAX_LEGEND_LAYERS:
    ax.legend(fontsize="small", ncol=2)
    return
  norm = matplotlib.colors.Normalize(min(layers), max(layers))
  sm = matplotlib.cm.ScalarMappable(norm=norm, cmap="viridis")
  fig.colorbar(sm, ax=ax, label="layer")


def _plot_per_layer(ax, run: Run, split: str, field: str, colors: dict, **kw) -> None:
  label_layers = kw.pop("label", True)
  for layer, rs in _by_layer(_split(run.moe, split)).items():
    steps, vals = _series(rs, field)
    if steps.size:
      ax.plot(steps, vals, color=colors[layer], label=f"layer {layer}" if label_layers else None,
              **kw)


def plot_loss(run: Run, out: str) -> str | None:
  if not run.metrics:
    return None
  fig, (ax, ax_bpb) = _figure(1, 2, width=5.5)
  for split, style in (("train", "-"), ("eval", "o-")):
    steps, loss = _series(_split(run.metrics, split), "loss")
    if steps.size:
      ax.plot(steps, loss, style, label=f"{split} loss", ms=3)
  ax.set(xlabel="step", ylabel="nats / token", title="Loss (train includes balancing terms)")
  ax.legend(fontsize="small")
  steps, bpb = _series(_split(run.metrics, "eval"), "bits_per_byte")
  ax_bpb.plot(steps, bpb, "o-", color="C1", ms=3)
  ax_bpb.set(xlabel="step", ylabel="bits / byte", title="Eval bits per byte")
  return _save(fig, out, "loss.png")


def _share_norm(max_share: float, e: int) -> matplotlib.colors.Normalize:
  """Diverging around the even share 1/E: blue under-, red over-loaded, dark blue dead."""
  return matplotlib.colors.TwoSlopeNorm(vcenter=1 / e, vmin=0, vmax=max(max_share, 2 / e))


def plot_load_latest(run: Run, out: str) -> str | None:
  latest = latest_train(run)
  if not latest:
    return None
  layers = list(latest)
  share_LxE = np.array([_share(latest[layer]["expert_load"]) for layer in layers])
  e = share_LxE.shape[1]
  fig, (ax,) = _figure(width=max(6.5, 0.2 * e + 3), height=max(2.5, 0.3 * len(layers) + 1.5))
  im = ax.imshow(share_LxE, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                 norm=_share_norm(share_LxE.max(), e))
  ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
  step = max(r["step"] for r in latest.values())
  ax.set(xlabel="expert", ylabel="layer", title=f"Load share at step {step} (even = 1/E)")
  fig.colorbar(im, ax=ax, label="share of assignments")
  return _save(fig, out, "load_latest.png")


def plot_load_over_time(run: Run, out: str) -> str | None:
  by_layer = _by_layer(_split(run.moe, "train"))
  if not by_layer:
    return None
  ncols = min(4, math.ceil(math.sqrt(len(by_layer))))
  nrows = math.ceil(len(by_layer) / ncols)
  shares = {layer: np.array([_share(r["expert_load"]) for r in rs]).T
            for layer, rs in by_layer.items()}
  e = next(iter(shares.values())).shape[0]
  norm = _share_norm(max(s.max() for s in shares.values()), e)  # one scale for all panels
  fig, axes = _figure(nrows, ncols, width=4.2, height=3.0)
  for ax, (layer, rs) in zip(axes, by_layer.items()):
    steps = np.array([r["step"] for r in rs])
    im = ax.pcolormesh(steps, np.arange(e), shares[layer], shading="nearest", cmap="RdBu_r",
                       norm=norm)
    ax.set(title=f"layer {layer}", xlabel="step", ylabel="expert")
  for ax in axes[len(by_layer):]:
    ax.set_axis_off()
  fig.colorbar(im, ax=list(axes), label="share (even = 1/E)")
  fig.suptitle("Load share per expert over training (train windows)")
  return _save(fig, out, "load_over_time.png")


def plot_dropped(run: Run, out: str) -> str | None:
  if not run.moe:
    return None
  layers = sorted({r["layer"] for r in run.moe})
  colors = _layer_colors(layers)
  fig, (ax,) = _figure(width=8)
  _plot_per_layer(ax, run, "train", "dropped_fraction", colors)
  _plot_per_layer(ax, run, "eval", "train_capacity_dropped_fraction", colors, ls="--",
                  marker="o", ms=3, label=False)
  ax.set(xlabel="step", ylabel="dropped fraction",
         title="Dropped assignments (solid: train; dashed: train capacity on eval tokens)")
  _layer_legend(fig, ax, layers)
  return _save(fig, out, "dropped.png")


def plot_needed_cf(run: Run, out: str) -> str | None:
  if not _split(run.moe, "train"):
    return None
  layers = sorted({r["layer"] for r in run.moe})
  colors = _layer_colors(layers)
  fig, (ax,) = _figure(width=8)
  _plot_per_layer(ax, run, "train", "needed_capacity_factor", colors)
  cf = current_cf(run)
  if cf:
    ax.axhline(cf, color="red", ls=":", label=f"configured cf = {cf:g}")
  title = "Needed capacity factor (dropless per sequence), train windows"
  ax.set(xlabel="step", ylabel="capacity factor",
         title=title if cf else title + " (dropless run)")
  _layer_legend(fig, ax, layers)
  return _save(fig, out, "needed_cf.png")


def plot_entropy(run: Run, out: str) -> str | None:
  train = _split(run.moe, "train")
  if not train:
    return None
  layers = sorted({r["layer"] for r in run.moe})
  colors = _layer_colors(layers)
  has_margin = any("topk_margin" in r for r in train)
  has_churn = any(r.get("routing_churn") is not None for r in train)
  ncols = 1 + has_margin + has_churn
  fig, axes = _figure(1, ncols, width=8 if ncols == 1 else 5)
  _plot_per_layer(axes[0], run, "train", "router_entropy", colors)
  e = len(train[-1]["expert_load"])
  axes[0].axhline(math.log(e), color="red", ls=":", label=f"ln E = {math.log(e):.2f}")
  axes[0].set(xlabel="step", ylabel="nats", title="Router entropy (train)")
  _layer_legend(fig, axes[0], layers)
  if has_margin:
    _plot_per_layer(axes[1], run, "train", "topk_margin", colors)
    axes[1].set(xlabel="step", ylabel="margin", title="Top-k margin (train)")
  if has_churn:
    _plot_per_layer(axes[-1], run, "train", "routing_churn", colors)
    axes[-1].set(xlabel="step", ylabel="fraction of probe tokens", yscale="log",
                 title="Routing churn (first choice changed)")
  return _save(fig, out, "entropy.png")


FIGURES = (
    (plot_loss, "Train and eval loss; eval bits per byte."),
    (plot_load_latest, "Share of each expert's assignments (before dropping), latest train "
                       "window."),
    (plot_load_over_time, "Load share per expert over training, one panel per MoE layer."),
    (plot_dropped, "Dropped fraction per layer."),
    (plot_needed_cf, "Smallest factor that would have dropped nothing in any sequence of the "
                     "window, with the configured factor."),
    (plot_entropy, "Router entropy per layer (ln E = uniform routing), the gap between the "
                   "k-th and (k+1)-th router probability, and routing churn: the share of a "
                   "fixed probe batch whose first-choice expert changed since the last log."),
)


# The page.


def _fmt(v, spec: str = ".4f") -> str:
  if v is None:
    return "–"
  return format(v, spec) if math.isfinite(v) else str(v)


def summary_md(s: dict) -> list[str]:
  dispatch = ", ".join(f"{k}: {v}" for k, v in s["dispatch"].items())
  cf = "dropless" if s["current_cf"] is None else f"{s['current_cf']:g}"
  dead = ("; ".join(f"layer {layer}: {experts}" for layer, experts in s["dead_experts"].items())
          or "none")
  lines = [
      "## Summary", "",
      f"- steps: {_fmt(s['steps'], 'd')}; final train loss {_fmt(s['final_train_loss'])}; "
      f"final eval {_fmt(s['final_eval_bpb'])} bits/byte",
      f"- MoE layers {s['moe_layers'] or '–'}; {_fmt(s['num_experts'], 'd')} experts, "
      f"top_k {_fmt(s['top_k'], 'd')}; dispatch {dispatch}; training capacity factor {cf}",
      f"- mean dropped fraction over recent train windows: {_fmt(s['recent_dropped'])}",
      f"- dead experts (zero load in the latest train window): {dead}",
  ]
  if s["max_overload_factor"] is not None:
    lines.append(f"- overload factor (max over layers, latest window; 1.0 = even ranks): "
                 f"{s['max_overload_factor']:.3f}")
  return lines + [""]


def recommendation_md(rows: list[dict], target: float, recent: int) -> list[str]:
  lines = ["## Capacity factor recommendation", ""]
  if not rows:
    return lines + ["No train windows in moe_stats.jsonl: nothing to recommend.", ""]
  cf_now = rows[0]["current_cf"]
  lines += [
      f"Smallest factor keeping drops ≤ {target:.2%} in ≥ {WINDOW_QUANTILE:.0%} of the last "
      f"{recent} train windows, estimated from each window's per-sequence load histogram "
      "(or, for older records, with capacity pooled over the window, which is optimistic; "
      "the `estimate` column says which; compare the actual and estimated drops at the "
      "current factor); `max needed` is the exact per-sequence dropless bound over the same "
      "windows. Cost = expert buffer rows and expert FLOPs relative to the current factor.",
      "",
  ]
  if cf_now is None:
    lines += ["**Dropless run**: nothing is dropped; the table says what a capacity run "
              "would need.", ""]
  lines += ["| layer | windows | dropped (actual) | dropped (estimated) | estimate | "
            "recommended cf | max needed cf | current cf | cost |",
            "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
  for r in rows:
    rec = "> 8.0" if r["recommended_cf"] is None else f"{r['recommended_cf']:.2f}"
    cur = "dropless" if r["current_cf"] is None else f"{r['current_cf']:g}"
    cost = "–" if r["cost"] is None else f"{r['cost']:.2f}×"
    lines.append(f"| {r['layer']} | {r['windows']} | {_fmt(r['recent_dropped'])} | "
                 f"{_fmt(r['pooled_dropped'])} | {r['estimate']} | {rec} | "
                 f"{_fmt(r['max_needed_cf'], '.2f')} | {cur} | {cost} |")
  return lines + [""]


def write_report(workdir: str, out: str | None = None, target_drop: float = 0.01,
                 recent: int = 20) -> str:
  """Writes the figures and report.md into `out` (default workdir/report); returns the page."""
  out = out or os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  run = load_run(workdir)
  lines = [f"# Routing health: `{workdir}`", ""]
  lines += summary_md(summary(run, recent))
  if not run.moe:
    lines += ["**No MoE statistics**: moe_stats.jsonl is missing or empty.", ""]
  else:
    lines += recommendation_md(recommend(run, target_drop, recent), target_drop, recent)
  lines += ["## Figures", ""]
  for plot, caption in FIGURES:
    name = plot(run, out)
    if name:
      lines += [f"{caption}", "", f"![{name}]({name})", ""]
  if not run.metrics:
    lines += ["No metrics.jsonl lines: no loss curves.", ""]
  page = os.path.join(out, "report.md")
  with open(page, "w") as f:
    f.write("\n".join(lines))
  logging.info("wrote %s", page)
  return page


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
  flags.DEFINE_string("out", None, "Output folder (default WORKDIR/report).")
  flags.DEFINE_float("target_drop", 0.01, "Drop fraction the recommendation allows.")
  flags.DEFINE_integer("recent", 20, "Train windows the recommendation looks at.")


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  page = write_report(f.workdir, f.out, f.target_drop, f.recent)
  print(f"moex.report: {page}", flush=True)


if __name__ == "__main__":
  _define_flags()  # here, not at import, so importing the module defines no flags
  app.run(main)
