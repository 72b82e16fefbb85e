"""Fitting a loss law to runs: Huber loss on log-loss, L-BFGS from a grid of starts, bootstrap.

As Hoffmann et al. 2022 (approach 3) and Besiroglu et al. 2024 fit the Chinchilla form:
minimize sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i) with
delta = 1e-3, by L-BFGS from every point of a grid of starts (alpha, beta in {0, 0.5, ..., 2},
e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}), keeping the best; A = exp(a), B = exp(b),
E = exp(e). By default the whole grid is evaluated at once and L-BFGS runs from its 100 best
points (fit's `keep`; 0 = from all 4,500, as the papers). Both laws here are a
log-sum-exp of terms linear in their parameters, so one engine (lse_fit) fits either; each
form (moex.scaling.forms) gives its designs, starts and coefficients:

  chinchilla    terms [a - alpha log N], [b - beta log D], [e]
  ludziejewski  [log a + delta lnÊ + (alpha + gamma lnÊ) log N],
                [log b + omega lnÊ + (beta + zeta lnÊ) log D], [log c]  (alpha, beta < 0)

Arrays here are indexed by runs, fit parameters, terms and starts. Every capital letter
already means something in moex's tensors (WORKSPACE.md, Layout), so these name their axes
in words: `terms_by_run` is [runs, terms], `terms_by_start` [starts, runs, terms].

Confidence intervals: the fit repeated on bootstrap resamples of the runs (with
replacement), percentile intervals of every coefficient.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import re

import numpy as np
from scipy import optimize

from moex.scaling import forms, laws
from moex.scaling.runs import RunPoint, ScalingError

HUBER_DELTA = 1e-3
# The objective is tiny (residuals ~1e-3 in log-loss), so L-BFGS-B's default stopping rule
# (relative to max(|f|, 1)) ends far from the minimum; these stop at it.
LBFGS_OPTIONS = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000}
# Hoffmann et al.'s grid of starts (Appendix D.2), as (a, alpha, b, beta, e).
GRID = {"a": np.arange(0, 30, 5.0), "alpha": np.arange(0, 2.5, 0.5),
        "b": np.arange(0, 30, 5.0), "beta": np.arange(0, 2.5, 0.5),
        "e": np.arange(-1, 1.5, 0.5)}


def lse_objective(theta: np.ndarray, designs: tuple[np.ndarray, list[tuple[int, int]]],
                  log_loss: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
  """Sum of Huber(LSE_k(X_k theta_k) - log L) and its gradient in theta.

  Written for speed (it runs thousands of times per fit): `designs` is (x, slices), x the
  column-stacked designs of the terms ([runs, parameters]), slices their column ranges."""
  x, slices = designs
  product = x * theta  # [runs, parameters]
  terms_by_run = np.stack([product[:, lo:hi].sum(1) for lo, hi in slices], 1)
  top = terms_by_run.max(1)  # [runs]
  exp_by_run = np.exp(terms_by_run - top[:, None])
  total = exp_by_run.sum(1)
  residual = top + np.log(total) - log_loss
  size = np.abs(residual)
  value = np.where(size <= delta, 0.5 * residual * residual,
                   delta * (size - 0.5 * delta)).sum()
  weights_by_run = exp_by_run * (np.clip(residual, -delta, delta) / total)[:, None]
  grad = np.concatenate([weights_by_run[:, k] @ x[:, lo:hi] for k, (lo, hi) in
                         enumerate(slices)])
  return float(value), grad


def stacked(designs: list[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """The terms' design matrices side by side and each one's column range."""
  sizes = np.cumsum([0] + [x.shape[1] for x in designs])
  return np.concatenate(designs, 1), list(zip(sizes[:-1], sizes[1:]))


def _openblas_threads() -> list[tuple]:
  """(get, set) thread-count functions of every OpenBLAS loaded in this process (numpy's and
  scipy's bundle one each; Linux /proc/self/maps), as threadpoolctl finds them."""
  try:
    with open("/proc/self/maps") as f:
      paths = sorted(set(re.findall(r"(/\S*openblas\S*\.so[\w.]*)", f.read())))
  except OSError:
    return []
  found = []
  for path in paths:
    lib = ctypes.CDLL(path)
    for name in ("scipy_openblas", "openblas"):
      for suffix in ("64_", ""):
        get = getattr(lib, f"{name}_get_num_threads{suffix}", None)
        put = getattr(lib, f"{name}_set_num_threads{suffix}", None)
        if get is not None and put is not None:
          found.append((get, put))
          break
      else:
        continue
      break
  return found


@contextlib.contextmanager
def one_blas_thread():
  """OpenBLAS on one thread inside: L-BFGS-B's tiny vector operations ran 6x slower with
  its thread pool on a busy 2-core machine (3 ms per iteration instead of 0.5)."""
  libs = _openblas_threads()
  before = [get() for get, _ in libs]
  for _, put in libs:
    put(1)
  try:
    yield
  finally:
    for (_, put), n in zip(libs, before):
      put(n)


def screen(designs: list[np.ndarray], log_loss: np.ndarray, starts: np.ndarray, keep: int,
           delta: float = HUBER_DELTA) -> np.ndarray:
  """The `keep` rows of `starts` with the lowest objective (all rows evaluated at once)."""
  if keep <= 0 or keep >= len(starts):
    return starts
  x, slices = stacked(designs)
  product = x[None] * starts[:, None, :]  # [starts, runs, parameters]
  terms_by_start = np.stack([product[..., lo:hi].sum(-1) for lo, hi in slices], -1)
  top = terms_by_start.max(-1)  # [starts, runs]
  predicted = top + np.log(np.exp(terms_by_start - top[..., None]).sum(-1))
  size = np.abs(predicted - log_loss)
  value = np.where(size <= delta, 0.5 * size ** 2, delta * (size - 0.5 * delta)).sum(-1)
  return starts[np.argsort(value, kind="stable")[:keep]]


def lse_fit(designs: list[np.ndarray], log_loss: np.ndarray, starts: np.ndarray,
            delta: float = HUBER_DELTA) -> tuple[np.ndarray, float]:
  """The best of L-BFGS runs from every row of `starts`: (theta, objective)."""
  best, best_value, packed = None, np.inf, stacked(designs)
  with np.errstate(over="ignore", invalid="ignore"), one_blas_thread():
    for start in starts:
      res = optimize.minimize(lse_objective, start, args=(packed, log_loss, delta), jac=True,
                              method="L-BFGS-B", options=LBFGS_OPTIONS)
      if np.all(np.isfinite(res.x)) and res.fun < best_value:
        best, best_value = res.x, res.fun
  if best is None:
    raise ScalingError("fit: no start converged to a finite fit")
  return best, best_value


def grid_starts(grid: dict[str, np.ndarray] = GRID) -> np.ndarray:
  """Every combination of the grid as chinchilla theta rows (a, alpha, b, beta, e)."""
  keys = ("a", "alpha", "b", "beta", "e")
  return np.array(list(itertools.product(*(grid[k] for k in keys))), float)


@dataclasses.dataclass
class Fit:
  """A fitted law with bootstrap intervals and the runs it was fitted on."""

  law: laws.Law
  ci: dict[str, tuple[float, float]]
  runs: list[RunPoint]
  objective: float
  bootstrap: int

  def predict(self, p: RunPoint) -> float:
    return float(self.law.loss(p.n_active, p.tokens, p.expansion))


def _arrays(runs: list[RunPoint]) -> tuple[np.ndarray, ...]:
  return (np.array([r.n_active for r in runs]), np.array([r.tokens for r in runs]),
          np.array([r.expansion for r in runs]), np.log([r.loss for r in runs]))


def form_of(runs: list[RunPoint]) -> str:
  """chinchilla when every run has the same expansion E, else the joint (ludziejewski) law."""
  return "chinchilla" if len({r.expansion for r in runs}) == 1 else "ludziejewski"


def fit_theta(runs: list[RunPoint], form: str, starts: np.ndarray, delta: float,
              keep: int = 0) -> tuple[np.ndarray, float]:
  """The law's parameters fitted from the `keep` best of `starts` (0: all of them)."""
  n, d, e, y = _arrays(runs)
  designs = forms.FORMS[form].designs(n, d, e)
  return lse_fit(designs, y, screen(designs, y, starts, keep, delta), delta)


def ranges_of(runs: list[RunPoint]) -> dict[str, tuple[float, float]]:
  """The fitted ranges of N, D and E (the planner warns outside them)."""
  get = lambda f: (min(f(r) for r in runs), max(f(r) for r in runs))
  return {"n": get(lambda r: r.n_active), "d": get(lambda r: r.tokens),
          "e": get(lambda r: r.expansion)}


def fit(runs: list[RunPoint], name: str = "fitted", bootstrap: int = 200, seed: int = 0,
        grid: dict[str, np.ndarray] = GRID, delta: float = HUBER_DELTA, keep: int = 100,
        bootstrap_keep: int = 8) -> Fit:
  """Fits the law (form_of(runs)) with `bootstrap` resamples for percentile intervals.

  L-BFGS runs from the `keep` grid points of lowest objective (0: from all of them, as
  Hoffmann et al.; the ranking costs one vectorized evaluation of the whole grid). Each
  resample starts from the point estimate and its own `bootstrap_keep` best grid points.
  """
  form = form_of(runs)
  unit = forms.FORMS[form]
  if len(runs) < unit.coefficients:
    raise ScalingError(f"fit: {len(runs)} runs for the {unit.coefficients}-coefficient {form} "
                       f"law; give at least {unit.coefficients}")
  starts = unit.starts(grid_starts(grid))
  theta, objective = fit_theta(runs, form, starts, delta, keep)
  law = laws.Law(name, form, unit.coef_of(theta), f"fitted to {len(runs)} moex runs",
                 ranges_of(runs))
  ci = bootstrap_ci(runs, form, theta, starts, bootstrap, seed, delta, bootstrap_keep)
  return Fit(law, ci, runs, objective, bootstrap)


def bootstrap_ci(runs: list[RunPoint], form: str, theta: np.ndarray, starts: np.ndarray,
                 samples: int, seed: int, delta: float, keep: int,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
  """Percentile intervals of every coefficient over resamples of the runs."""
  if samples <= 0:
    return {}
  rng = np.random.default_rng(seed)
  coefs = []
  for _ in range(samples):
    sample = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
    n, d, e, y = _arrays(sample)
    designs = forms.FORMS[form].designs(n, d, e)
    rows = np.vstack([theta, screen(designs, y, starts, keep, delta)])
    coefs.append(forms.FORMS[form].coef_of(lse_fit(designs, y, rows, delta)[0]))
  tail = (1 - level) / 2 * 100
  return {k: (float(np.percentile([c[k] for c in coefs], tail)),
              float(np.percentile([c[k] for c in coefs], 100 - tail)))
          for k in coefs[0] if k not in ("e_start", "e_max")}
