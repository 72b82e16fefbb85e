"""Scaling-law forms as units: each form says, in one class, everything the planner, the
fitter and the experiment writer ask of it.

A form declares its loss (in its own N convention), the model's stored parameters and
training FLOPs, the candidate (E, G) pairs the planner chooses among, how a plan is
described and built as MoE layers, and (for forms moex fits) the log-sum-exp designs of
moex.scaling.fit. A law (moex.scaling.laws.Law) is a form's name plus coefficients.
Adding a form: a subclass here registered in FORMS, its published coefficients in laws.py,
its table test in tests/scaling_plan_test.py.

  chinchilla    Hoffmann et al. 2022: L = E + A/N^alpha + B/D^beta; C = 6 N D; dense.
  krajewski     Krajewski et al. 2024, E = 64: L = c + (g/G^gamma + a)/N^alpha + b/D^beta
                with N the total parameters; their per-block FLOPs count; chooses G.
  ludziejewski  Ludziejewski et al. 2025: L = a Ê^delta N^(alpha + gamma ln Ê)
                + b Ê^omega D^(beta + zeta ln Ê) + c, Ê by Clark et al.'s saturation;
                C = 6 N_act D; chooses E.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize

FFN_SHARE = 2 / 3  # of a transformer's active parameters: FFN 8 d^2 of 12 d^2 per block
LOG_N = (math.log(1e3), math.log(1e15))  # the search range of active parameters
GRANULARITIES = (1, 2, 4, 8, 16, 32, 64)  # G candidates of Krajewski et al.'s law
# Clark et al.'s saturation constants, as Ludziejewski et al. use them (and moex's fits).
E_START, E_MAX = 2.0732, 290.4521


def chinchilla_loss(c: dict[str, float], n, d):
  """Hoffmann et al.'s L = E + A/N^alpha + B/D^beta."""
  return c["E"] + c["A"] / n ** c["alpha"] + c["B"] / d ** c["beta"]


def krajewski_loss(c: dict[str, float], n, d, g):
  """Krajewski et al.'s L = c + (g/G^gamma + a)/N^alpha + b/D^beta (N total parameters)."""
  return c["c"] + (c["g"] / g ** c["gamma"] + c["a"]) / n ** c["alpha"] + c["b"] / d ** c["beta"]


def e_hat(e, e_start: float, e_max: float):
  """Clark et al.'s saturating expansion: 1/Ê = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max.

  Ê(1) = E_start; Ê -> E_max as E grows."""
  e = np.asarray(e, float)
  return 1.0 / (1.0 / (e - 1.0 + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max)


def ludziejewski_loss(c: dict[str, float], n, d, e):
  """Ludziejewski et al.'s joint law (the exponents alpha, beta are negative as published)."""
  le = np.log(e_hat(e, c["e_start"], c["e_max"]))
  first = c["a"] * np.exp(c["delta"] * le) * n ** (c["alpha"] + c["gamma"] * le)
  second = c["b"] * np.exp(c["omega"] * le) * d ** (c["beta"] + c["zeta"] * le)
  return first + second + c["c"]


# Krajewski et al.'s FLOPs accounting (their compute-optimal section): per token per block
# 12 d^2 c_f (attention 4 d^2 + the active FFN 8 d^2, c_f = 6 FLOPs per weight for forward
# and backward) + d E G c_r (the router, c_r = 14), with d_model = 64 n_blocks.
KRAJEWSKI_CF, KRAJEWSKI_CR, KRAJEWSKI_ASPECT = 6.0, 14.0, 64.0


def krajewski_shape(n_active):
  """(n_blocks, d_model) of a model with `n_active` = 12 d^2 n_blocks, d = 64 n_blocks."""
  blocks = (np.asarray(n_active, float) / (12 * KRAJEWSKI_ASPECT ** 2)) ** (1 / 3)
  return blocks, KRAJEWSKI_ASPECT * blocks


def krajewski_total(n_active, e: float = 64.0):
  """Total parameters (the law's N): n_blocks (4 d^2 attention + E x 8 d^2 experts)."""
  blocks, d = krajewski_shape(n_active)
  return blocks * d * d * (4 + 8 * e)


def krajewski_flops(n_active, tokens, g, e: float = 64.0):
  """Training FLOPs: n_blocks (12 d^2 c_f + d E G c_r) D."""
  blocks, d = krajewski_shape(n_active)
  return blocks * (12 * d * d * KRAJEWSKI_CF + d * e * g * KRAJEWSKI_CR) * np.asarray(tokens, float)


class Form:
  """A law form: C = 6 N D, N the active parameters, E experts of the FFN's size (the
  defaults); a subclass overrides what its paper does differently."""

  name = ""
  moe = True
  choice = "E"  # the value the planner optimizes over: "E" (expansion) or "G"
  coefficients = 0  # how many a fit determines (0: moex does not fit this form)

  def loss(self, coef: dict[str, float], n, d, e, g):
    """The loss at `n` as the paper counts N (active parameters unless overridden)."""
    raise NotImplementedError

  def loss_at(self, coef: dict[str, float], n_active, tokens, e: float, g: float):
    """The loss of a model with `n_active` active parameters."""
    return self.loss(coef, np.asarray(n_active, float), np.asarray(tokens, float), e, g)

  def total_params(self, n_active, e: float):
    """Stored parameters at expansion `e`: the FFN share of the active ones times E."""
    return n_active * (1 + (e - 1) * FFN_SHARE)

  def train_flops(self, n_active, tokens, e: float, g: float):
    del e, g
    return 6.0 * np.asarray(n_active) * np.asarray(tokens)

  def max_log_active(self, e: float, memory_params: float) -> float:
    """log of the largest active N whose total parameters are at most `memory_params`."""
    per_active = float(self.total_params(1e9, e)) / 1e9
    return math.log(memory_params / per_active)

  def candidates(self, experts: tuple[float, ...], ranges: dict) -> list[tuple[float, float]]:
    """The (E, G) pairs the planner chooses among."""
    del ranges
    return [(float(e), 1.0) for e in experts]

  def describe(self, e: float, g: float) -> str:
    """The plan's MoE values in its one-line description."""
    del g
    return f", E {e:g}" if self.moe else ""

  def experts(self, e: float, g: float) -> tuple[int, int, float] | None:
    """(routed experts, top-k, FFN width over expert width) of a written config; None:
    dense."""
    del g
    return (int(round(e)), 1, 1.0) if self.moe and round(e) > 1 else None

  # Fitting (moex.scaling.fit): log L = LSE_k(design_k @ theta_k).
  def designs(self, n: np.ndarray, d: np.ndarray, e: np.ndarray) -> list[np.ndarray]:
    raise NotImplementedError(f"moex does not fit the {self.name} form")

  def coef_of(self, theta: np.ndarray) -> dict[str, float]:
    raise NotImplementedError(f"moex does not fit the {self.name} form")

  def starts(self, chinchilla_rows: np.ndarray) -> np.ndarray:
    """Fit starts from rows of Hoffmann et al.'s grid (a, alpha, b, beta, e)."""
    raise NotImplementedError(f"moex does not fit the {self.name} form")


class Chinchilla(Form):
  """Hoffmann et al.'s dense law (and Besiroglu et al.'s refit)."""

  name, moe, coefficients = "chinchilla", False, 5

  def loss(self, coef, n, d, e, g):
    del e, g
    return chinchilla_loss(coef, n, d)

  def candidates(self, experts, ranges):
    del experts, ranges
    return [(1.0, 1.0)]

  def designs(self, n, d, e):
    del e
    ones = np.ones_like(n)
    return [np.stack([ones, -np.log(n)], 1), np.stack([ones, -np.log(d)], 1), ones[:, None]]

  def coef_of(self, theta):
    a, alpha, b, beta, e = theta
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
            "alpha": float(alpha), "beta": float(beta)}

  def starts(self, chinchilla_rows):
    return chinchilla_rows


JOINT_KEYS = ("a", "delta", "alpha", "gamma", "b", "omega", "beta", "zeta", "c")


class Ludziejewski(Form):
  """Ludziejewski et al.'s joint law over the expansion E (moex's joint fit)."""

  name, coefficients = "ludziejewski", 9

  def loss(self, coef, n, d, e, g):
    del g
    return ludziejewski_loss(coef, n, d, np.asarray(e, float))

  def candidates(self, experts, ranges):
    """The candidate E within the range a fitted law saw (all of them if none is)."""
    if "e" in ranges:
      low, high = ranges["e"]
      experts = tuple(e for e in experts if low <= e <= high) or experts
    return [(float(e), 1.0) for e in experts]

  def designs(self, n, d, e):
    ones, le = np.ones_like(n), np.log(e_hat(e, E_START, E_MAX))
    return [np.stack([ones, le, np.log(n), le * np.log(n)], 1),
            np.stack([ones, le, np.log(d), le * np.log(d)], 1), ones[:, None]]

  def coef_of(self, theta):
    c = dict(zip(JOINT_KEYS, map(float, theta)))
    c["a"], c["b"], c["c"] = np.exp(c["a"]), np.exp(c["b"]), np.exp(c["c"])
    return {**{k: float(v) for k, v in c.items()}, "e_start": E_START, "e_max": E_MAX}

  def starts(self, chinchilla_rows):
    """Joint-law starts from chinchilla ones: no E dependence, exponents negated."""
    a, alpha, b, beta, e = chinchilla_rows.T
    zero = np.zeros_like(a)
    return np.stack([a, zero, -alpha, zero, b, zero, -beta, zero, e], 1)


class Krajewski(Form):
  """Krajewski et al.'s fine-grained law at E = 64: N total, their FLOPs, chooses G."""

  name, choice = "krajewski", "G"

  def loss(self, coef, n, d, e, g):
    del e
    return krajewski_loss(coef, n, d, np.asarray(g, float))

  def loss_at(self, coef, n_active, tokens, e, g):
    return self.loss(coef, np.asarray(self.total_params(n_active, e), float),
                     np.asarray(tokens, float), e, g)

  def total_params(self, n_active, e):
    return krajewski_total(n_active, e)

  def train_flops(self, n_active, tokens, e, g):
    return krajewski_flops(n_active, tokens, g, e)

  def max_log_active(self, e, memory_params):
    f = lambda x: math.log(float(krajewski_total(math.exp(x), e)) / memory_params)
    return optimize.brentq(f, *LOG_N)

  def candidates(self, experts, ranges):
    del experts, ranges
    return [(64.0, float(g)) for g in GRANULARITIES]

  def describe(self, e, g):
    return f", E {e:g}, G {g:g}"

  def experts(self, e, g):
    del e
    return (64 * int(g), int(g), float(g))


FORMS: dict[str, Form] = {f.name: f for f in (Chinchilla(), Krajewski(), Ludziejewski())}
