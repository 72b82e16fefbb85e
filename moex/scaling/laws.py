"""Scaling-law forms and their published coefficients: the one place they are written down.

Every law predicts the final loss (nats per token, on its authors' data and tokenizer) from
the active parameters N, the training tokens D and, for MoE laws, the expansion E (total
over active routed-expert parameters; 1 = dense) or the granularity G (dense FFN width over
expert width). Sources (shared/REFERENCES.md lists the same numbers):

  chinchilla    Hoffmann et al. 2022 (arXiv 2203.15556), approach 3:
                L = E + A/N^alpha + B/D^beta; C = 6 N D.
  epoch         Besiroglu et al. 2024 (arXiv 2404.10102), the refit of approach 3 on the
                data recovered from Hoffmann et al.'s figure; same form.
  krajewski     Krajewski et al. 2024 (arXiv 2402.07871), E = 64:
                L = c + (g/G^gamma + a)/N^alpha + b/D^beta with N the total parameters;
                FLOPs per token per block 12 d^2 c_f + d E G c_r (c_f 6, c_r 14) with
                d_model = 64 n_blocks (their compute-optimal tables' accounting, krajewski_flops).
  ludziejewski  Ludziejewski et al. 2025 (arXiv 2502.05172):
                L = a Ê^delta N^(alpha + gamma ln Ê) + b Ê^omega D^(beta + zeta ln Ê) + c,
                Ê from E by Clark et al.'s saturation; C = 6 N_act D.

Fitted laws (moex.scaling.fit) use the chinchilla form per family or the ludziejewski form
over families with different E, and the same FLOPs convention C = 6 N D.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FORMS = ("chinchilla", "krajewski", "ludziejewski")


@dataclasses.dataclass(frozen=True)
class Law:
  """A loss law: its form, coefficients, source and the ranges it was fitted on.

  `ranges` maps "n" (active parameters), "d" (tokens), "e" (expansion) to (low, high); a
  planner request outside them is an extrapolation (warned, not refused). Only ranges the
  source states are given.
  """

  name: str
  form: str
  coef: dict[str, float]
  source: str
  ranges: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

  def loss(self, n, d, e=1.0, g=1.0) -> np.ndarray:
    """Predicted loss at active parameters `n`, tokens `d`, expansion `e`, granularity `g`.

    (krajewski: `n` is the total parameter count, as in the paper, and `e` is fixed at 64.)
    """
    n, d = np.asarray(n, float), np.asarray(d, float)
    if self.form == "chinchilla":
      return chinchilla_loss(self.coef, n, d)
    if self.form == "krajewski":
      return krajewski_loss(self.coef, n, d, np.asarray(g, float))
    return ludziejewski_loss(self.coef, n, d, np.asarray(e, float))

  @property
  def moe(self) -> bool:
    return self.form != "chinchilla"


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


PUBLISHED = {
    "chinchilla": Law(
        "chinchilla", "chinchilla",
        {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28},
        "Hoffmann et al. 2022, arXiv 2203.15556, approach 3 (eq. 10)",
        {"n": (7e7, 1.6e10), "d": (5e9, 5e11)}),  # "70M to over 16B ... 5 to 500B tokens"
    "epoch": Law(
        "epoch", "chinchilla",
        {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658},
        "Besiroglu et al. 2024, arXiv 2404.10102 (refit of Hoffmann et al.'s approach 3)",
        {"n": (7e7, 1.6e10), "d": (5e9, 5e11)}),  # the same runs
    "krajewski": Law(
        "krajewski", "krajewski",
        {"a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147, "g": 2.1, "gamma": 0.58,
         "c": 0.47},
        "Krajewski et al. 2024, arXiv 2402.07871, the E = 64 fit",
        {"e": (64.0, 64.0)}),
    "ludziejewski": Law(
        "ludziejewski", "ludziejewski",
        {"a": 35.91, "alpha": -0.1889, "delta": -0.2285, "gamma": 0.0098, "b": 35.98,
         "beta": -0.1775, "omega": 0.5529, "zeta": -0.0259, "c": 1.3637,
         "e_start": 2.0732, "e_max": 290.4521},
        "Ludziejewski et al. 2025, arXiv 2502.05172 (joint MoE law, Clark et al.'s Ê)",
        {"n": (0.0, 2.7e9)}),  # "up to 2.7B active parameters"
}


def printed_half_unit(value: float) -> float:
  """Half a unit in the last digit `value` is printed with (REFERENCES.md, the papers): the
  rounding a published coefficient carries."""
  text = repr(value)
  decimals = len(text.split(".")[1]) if "." in text else 0
  return 0.5 * 10.0 ** -decimals
