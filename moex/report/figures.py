"""The report's PNG figures: one function each, returning its file name (None: no data).

Per-expert loads are drawn per expert while moe_stats.jsonl lists them, and as load share
percentiles over the experts once it summarizes them (more than moe.stats_max_experts).
"""

from __future__ import annotations

import math
import os

import matplotlib
import numpy as np
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moex import files
from moex.report import read
from moex.report.capacity import current_cf
from moex.report.read import Run

MAX_LEGEND_LAYERS = 12  # more layers than this get a colour bar instead of a legend
BANDS = (("0", "100", 0.12), ("5", "95", 0.25), ("25", "75", 0.45))  # (low, high, alpha)


def _figure(nrows: int = 1, ncols: int = 1, width: float = 7.0, height: float = 3.6):
  fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes.ravel()


def _save(fig: Figure, out: str, name: str) -> str:
  files.save_figure(fig, os.path.join(out, name), dpi=110)  # renamed into place whole
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
  for layer, rs in read.by_layer(read.split(run.moe, split)).items():
    steps, vals = read.series(rs, field)
    if steps.size:
      ax.plot(steps, vals, color=colors[layer], label=f"layer {layer}" if label_layers else None,
              **kw)


def _share_norm(max_share: float, e: int) -> matplotlib.colors.Normalize:
  """Diverging around the even share 1/E: blue under-, red over-loaded, dark blue dead."""
  return matplotlib.colors.TwoSlopeNorm(vcenter=1 / e, vmin=0, vmax=max(max_share, 2 / e))


def _plot_percentiles(ax, x: np.ndarray, records: list[dict]) -> None:
  """Bands of the load share over experts (x E: 1 = even) at each x, median as a line."""
  e = records[0]["num_experts"]
  pcts = [read.share_percentiles(r) for r in records]
  y = {q: np.array([p[q] * e for p in pcts]) for q in read.PERCENTILES}
  for low, high, alpha in BANDS:
    ax.fill_between(x, y[low], y[high], color="C0", alpha=alpha, lw=0,
                    label=f"p{low}-p{high}")
  ax.plot(x, y["50"], "o-", color="C0", ms=3, label="median")
  ax.axhline(1.0, color="red", ls=":", lw=1, label="even")


def plot_loss(run: Run, out: str) -> str | None:
  if not run.metrics:
    return None
  fig, (ax, ax_bpb) = _figure(1, 2, width=5.5)
  for split, style in (("train", "-"), ("eval", "o-")):
    steps, loss = read.series(read.split(run.metrics, split), "loss")
    if steps.size:
      ax.plot(steps, loss, style, label=f"{split} loss", ms=3)
  ax.set(xlabel="step", ylabel="nats / token", title="Loss (train includes balancing terms)")
  ax.legend(fontsize="small")
  steps, bpb = read.series(read.split(run.metrics, "eval"), "bits_per_byte")
  ax_bpb.plot(steps, bpb, "o-", color="C1", ms=3)
  ax_bpb.set(xlabel="step", ylabel="bits / byte", title="Eval bits per byte")
  return _save(fig, out, "loss.png")


def plot_load_latest(run: Run, out: str) -> str | None:
  latest = read.latest_train(run)
  if not latest:
    return None
  layers = list(latest)
  step = max(r["step"] for r in latest.values())
  shares = [read.load_share(latest[layer]) for layer in layers]
  if any(s is None for s in shares):  # summarized: percentiles over experts per layer
    fig, (ax,) = _figure(width=max(6.5, 0.4 * len(layers) + 3))
    _plot_percentiles(ax, np.array(layers), [latest[layer] for layer in layers])
    ax.set_xticks(layers)
    ax.set(xlabel="layer", ylabel="load share x E (1 = even)",
           title=f"Load share over the {latest[layers[0]]['num_experts']} experts at step "
                 f"{step} (percentiles)")
    ax.legend(fontsize="small", ncol=3)
    return _save(fig, out, "load_latest.png")
  share_LxE = np.array(shares)
  e = share_LxE.shape[1]
  fig, (ax,) = _figure(width=max(6.5, 0.2 * e + 3), height=max(2.5, 0.3 * len(layers) + 1.5))
  im = ax.imshow(share_LxE, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                 norm=_share_norm(share_LxE.max(), e))
  ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
  ax.set(xlabel="expert", ylabel="layer", title=f"Load share at step {step} (even = 1/E)")
  fig.colorbar(im, ax=ax, label="share of assignments")
  return _save(fig, out, "load_latest.png")


def plot_load_over_time(run: Run, out: str) -> str | None:
  layers = read.by_layer(read.split(run.moe, "train"))
  if not layers:
    return None
  ncols = min(4, math.ceil(math.sqrt(len(layers))))
  nrows = math.ceil(len(layers) / ncols)
  fig, axes = _figure(nrows, ncols, width=4.2, height=3.0)
  for ax in axes[len(layers):]:
    ax.set_axis_off()
  if any(read.is_summary(r["expert_load"]) for rs in layers.values() for r in rs):
    for ax, (layer, rs) in zip(axes, layers.items()):
      _plot_percentiles(ax, np.array([r["step"] for r in rs]), rs)
      ax.set(title=f"layer {layer}", xlabel="step", ylabel="load share x E (1 = even)")
    axes[0].legend(fontsize="x-small", ncol=2)
    fig.suptitle("Load share percentiles over experts during training (train windows)")
    return _save(fig, out, "load_over_time.png")
  shares = {layer: np.array([read.load_share(r) for r in rs]).T for layer, rs in layers.items()}
  e = next(iter(shares.values())).shape[0]
  norm = _share_norm(max(s.max() for s in shares.values()), e)  # one scale for all panels
  for ax, (layer, rs) in zip(axes, layers.items()):
    steps = np.array([r["step"] for r in rs])
    im = ax.pcolormesh(steps, np.arange(e), shares[layer], shading="nearest", cmap="RdBu_r",
                       norm=norm)
    ax.set(title=f"layer {layer}", xlabel="step", ylabel="expert")
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
  if not read.split(run.moe, "train"):
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
  train = read.split(run.moe, "train")
  if not train:
    return None
  layers = sorted({r["layer"] for r in run.moe})
  colors = _layer_colors(layers)
  has_margin = any(r.get("topk_margin") is not None for r in train)
  has_churn = any(r.get("routing_churn") is not None for r in train)
  ncols = 1 + has_margin + has_churn
  fig, axes = _figure(1, ncols, width=8 if ncols == 1 else 5)
  _plot_per_layer(axes[0], run, "train", "router_entropy", colors)
  e = train[-1]["num_experts"]
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
                       "window (percentiles over experts when moe_stats.jsonl summarizes "
                       "them)."),
    (plot_load_over_time, "Load share per expert over training, one panel per MoE layer "
                          "(percentiles over experts when summarized)."),
    (plot_dropped, "Dropped fraction per layer."),
    (plot_needed_cf, "Smallest factor that would have dropped nothing in any sequence of the "
                     "window, with the configured factor."),
    (plot_entropy, "Router entropy per layer (ln E = uniform routing), the gap between the "
                   "k-th and (k+1)-th router probability, and routing churn: the share of a "
                   "fixed probe batch whose first-choice expert changed since the last log."),
)
