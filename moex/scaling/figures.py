"""The fit's figures: measured vs fitted loss, and isoFLOP curves with the fitted optima."""

from __future__ import annotations


import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moex import files
from moex.scaling import plan
from moex.scaling.fit import Fit
from moex.scaling.runs import RunPoint


def _figure(ncols: int, width: float = 5.2, height: float = 4.0):
  fig = Figure(figsize=(width * ncols, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig, fig.subplots(1, ncols, squeeze=False).ravel()


def _save(fig: Figure, out: str) -> str:
  return files.save_figure(fig, out)  # renamed into place whole


def measured_vs_fitted(fits: dict[str, Fit], held: dict[str, RunPoint], out: str) -> str:
  """Left: loss against training compute (6 N D), runs and each family's fitted frontier;
  right: fitted against measured loss, held-out runs ringed."""
  fig, (left, right) = _figure(2)
  colors = matplotlib.colormaps["tab10"]
  everything = [r for f in fits.values() for r in f.runs] + list(held.values())
  c_C = np.geomspace(min(6 * r.n_active * r.tokens for r in everything) / 2,
                     max(6 * r.n_active * r.tokens for r in everything) * 2, 40)
  for i, (name, f) in enumerate(fits.items()):
    color = colors(i)
    mine = f.runs + ([held[name]] if name in held else [])
    e = mine[0].expansion
    left.plot(c_C, [plan.frontier_loss(f.law, c, e) for c in c_C], color=color, lw=1,
              label=f"{name}: fitted compute-optimal")
    left.scatter([6 * r.n_active * r.tokens for r in f.runs], [r.loss for r in f.runs],
                 color=color, s=18, label=f"{name}: fitted on")
    right.scatter([f.predict(r) for r in f.runs], [r.loss for r in f.runs], color=color, s=18,
                  label=name)
    if name in held:
      h = held[name]
      left.scatter([6 * h.n_active * h.tokens], [h.loss], facecolors="none",
                   edgecolors=color, s=90, lw=1.5, label=f"{name}: held out")
      right.scatter([f.predict(h)], [h.loss], facecolors="none", edgecolors=color, s=90, lw=1.5)
  lo, hi = min(r.loss for r in everything), max(r.loss for r in everything)
  right.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--")
  left.set(xscale="log", xlabel="training compute 6 N D (FLOPs)", ylabel="final eval loss (nats)")
  right.set(xlabel="fitted loss", ylabel="measured loss")
  left.set_title("Runs and fitted compute-optimal frontier")
  right.set_title("Measured vs fitted (rings: held out)")
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return _save(fig, out)


def isoflop(fits: dict[str, Fit], levels: int, out: str) -> str:
  """Per family: fitted loss against N along isoFLOP lines (6 N D = C) through the runs'
  compute range, the fitted optimum of each marked, and the runs coloured by their 6 N D."""
  fig, axes = _figure(len(fits))
  cmap = matplotlib.colormaps["viridis"]
  for ax, (name, f) in zip(axes, fits.items()):
    e = f.runs[0].expansion
    c_R = np.array([6 * r.n_active * r.tokens for r in f.runs])
    c_C = np.geomspace(c_R.min(), c_R.max(), levels)
    optima = [plan.optimum_at(f.law, c, e, 1.0) for c in c_C]
    n_N = np.geomspace(min([r.n_active for r in f.runs] + [b.n_active for b in optima]) / 2,
                       max(r.n_active for r in f.runs) * 4, 80)
    norm = matplotlib.colors.LogNorm(c_C.min(), c_C.max())
    for c, best in zip(c_C, optima):
      ax.plot(n_N, f.law.loss(n_N, c / (6 * n_N), e), color=cmap(norm(c)), lw=1)
      ax.scatter([best.n_active], [best.loss], marker="*", s=80, color=cmap(norm(c)),
                 edgecolors="black", lw=0.5, zorder=3)
    ax.scatter([r.n_active for r in f.runs], [r.loss for r in f.runs], c=c_R, cmap=cmap,
               norm=norm, s=18, edgecolors="black", lw=0.3, zorder=4)
    losses = [r.loss for r in f.runs] + [b.loss for b in optima]
    ax.set(xscale="log", xlabel="active parameters N", ylabel="loss (nats)",
           ylim=(min(losses) * 0.95, max(losses) * 1.1),
           title=f"{name}: fitted loss at 6 N D = C ({c_C.min():.1e} .. {c_C.max():.1e}); "
           "* optima, dots runs")
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
  return _save(fig, out)
