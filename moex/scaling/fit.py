"""Fitting a loss law to runs: Huber loss on log-loss, L-BFGS from a grid of starts, bootstrap.

As Hoffmann et al. 2022 (approach 3) and Besiroglu et al. 2024 fit the Chinchilla form:
minimize sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i) with
delta = 1e-3, by L-BFGS from every point of a grid of starts (alpha, beta in {0, 0.5, ..., 2},
e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}), keeping the best; A = exp(a), B = exp(b),
E = exp(e). By default the whole grid is evaluated at once and L-BFGS runs from its 100 best
points (fit's `keep`; 0 = from all 4,500, as the papers). Both laws here are a
log-sum-exp of terms linear in their parameters, so one engine (lse_fit) fits either:

  chinchilla    terms [a - alpha log N], [b - beta log D], [e]
  ludziejewski  [log a + delta lnÊ + (alpha + gamma lnÊ) log N],
                [log b + omega lnÊ + (beta + zeta lnÊ) log D], [log c]  (alpha, beta < 0)

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

from moex.scaling import laws
from moex.scaling.runs import RunPoint, ScalingError

HUBER_DELTA = 1e-3
# The objective is tiny (residuals ~1e-3 in log-loss), so L-BFGS-B's default stopping rule
# (relative to max(|f|, 1)) ends far from the minimum; these stop at it.
LBFGS_OPTIONS = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000}
# Hoffmann et al.'s grid of starts (Appendix D.2), as (a, alpha, b, beta, e).
GRID = {"a": np.arange(0, 30, 5.0), "alpha": np.arange(0, 2.5, 0.5),
        "b": np.arange(0, 30, 5.0), "beta": np.arange(0, 2.5, 0.5),
        "e": np.arange(-1, 1.5, 0.5)}
# Clark et al.'s saturation constants, as Ludziejewski et al. use them.
E_START, E_MAX = 2.0732, 290.4521


def lse_objective(theta: np.ndarray, designs: list[np.ndarray], log_loss: np.ndarray,
                  delta: float) -> tuple[float, np.ndarray]:
  """Sum of Huber(LSE_k(X_k theta_k) - log L) and its gradient in theta.

  Written for speed (it runs thousands of times per fit): `designs` is (X_RxP, slices),
  X the column-stacked designs of the terms, slices their column ranges."""
  x_RxP, slices = designs
  prod_RxP = x_RxP * theta
  terms_RxK = np.stack([prod_RxP[:, lo:hi].sum(1) for lo, hi in slices], 1)
  top_R = terms_RxK.max(1)
  exp_RxK = np.exp(terms_RxK - top_R[:, None])
  total_R = exp_RxK.sum(1)
  r_R = top_R + np.log(total_R) - log_loss
  a_R = np.abs(r_R)
  value = np.where(a_R <= delta, 0.5 * r_R * r_R, delta * (a_R - 0.5 * delta)).sum()
  weights_RxK = exp_RxK * (np.clip(r_R, -delta, delta) / total_R)[:, None]
  grad = np.concatenate([weights_RxK[:, k] @ x_RxP[:, lo:hi] for k, (lo, hi) in
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
  x_RxP, slices = stacked(designs)
  prod_SxRxP = x_RxP[None] * starts[:, None, :]
  terms_SxRxK = np.stack([prod_SxRxP[..., lo:hi].sum(-1) for lo, hi in slices], -1)
  top_SxR = terms_SxRxK.max(-1)
  pred_SxR = top_SxR + np.log(np.exp(terms_SxRxK - top_SxR[..., None]).sum(-1))
  a_SxR = np.abs(pred_SxR - log_loss)
  value_S = np.where(a_SxR <= delta, 0.5 * a_SxR ** 2, delta * (a_SxR - 0.5 * delta)).sum(-1)
  return starts[np.argsort(value_S, kind="stable")[:keep]]


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


def chinchilla_designs(n: np.ndarray, d: np.ndarray) -> list[np.ndarray]:
  ones = np.ones_like(n)
  return [np.stack([ones, -np.log(n)], 1), np.stack([ones, -np.log(d)], 1), ones[:, None]]


def chinchilla_coef(theta: np.ndarray) -> dict[str, float]:
  a, alpha, b, beta, e = theta
  return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
          "alpha": float(alpha), "beta": float(beta)}


def chinchilla_theta(c: dict[str, float]) -> np.ndarray:
  return np.array([np.log(c["A"]), c["alpha"], np.log(c["B"]), c["beta"], np.log(c["E"])])


def joint_designs(n: np.ndarray, d: np.ndarray, e: np.ndarray) -> list[np.ndarray]:
  ones, le = np.ones_like(n), np.log(laws.e_hat(e, E_START, E_MAX))
  return [np.stack([ones, le, np.log(n), le * np.log(n)], 1),
          np.stack([ones, le, np.log(d), le * np.log(d)], 1), ones[:, None]]


JOINT_KEYS = ("a", "delta", "alpha", "gamma", "b", "omega", "beta", "zeta", "c")


def joint_coef(theta: np.ndarray) -> dict[str, float]:
  c = dict(zip(JOINT_KEYS, map(float, theta)))
  c["a"], c["b"], c["c"] = np.exp(c["a"]), np.exp(c["b"]), np.exp(c["c"])
  return {**{k: float(v) for k, v in c.items()}, "e_start": E_START, "e_max": E_MAX}


def joint_starts(chinchilla_rows: np.ndarray) -> np.ndarray:
  """Joint-law starts from chinchilla ones: no E dependence, exponents negated."""
  a, alpha, b, beta, e = chinchilla_rows.T
  zero = np.zeros_like(a)
  return np.stack([a, zero, -alpha, zero, b, zero, -beta, zero, e], 1)


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
  designs = chinchilla_designs(n, d) if form == "chinchilla" else joint_designs(n, d, e)
  return lse_fit(designs, y, screen(designs, y, starts, keep, delta), delta)


def coef_of(theta: np.ndarray, form: str) -> dict[str, float]:
  return chinchilla_coef(theta) if form == "chinchilla" else joint_coef(theta)


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
  need = 5 if form == "chinchilla" else 9
  if len(runs) < need:
    raise ScalingError(f"fit: {len(runs)} runs for the {need}-coefficient {form} law; give "
                       f"at least {need}")
  starts = grid_starts(grid)
  if form != "chinchilla":
    starts = joint_starts(starts)
  theta, objective = fit_theta(runs, form, starts, delta, keep)
  law = laws.Law(name, form, coef_of(theta, form), f"fitted to {len(runs)} moex runs",
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
    designs = chinchilla_designs(n, d) if form == "chinchilla" else joint_designs(n, d, e)
    rows = np.vstack([theta, screen(designs, y, starts, keep, delta)])
    coefs.append(coef_of(lse_fit(designs, y, rows, delta)[0], form))
  tail = (1 - level) / 2 * 100
  return {k: (float(np.percentile([c[k] for c in coefs], tail)),
              float(np.percentile([c[k] for c in coefs], 100 - tail)))
          for k in coefs[0] if k not in ("e_start", "e_max")}
