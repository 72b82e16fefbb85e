"""Published laws and their coefficients: the one place they are written down.

Every law predicts the final loss (nats per token, on its authors' data and tokenizer) from
the active parameters N, the training tokens D and, for MoE laws, the expansion E (total
over active routed-expert parameters; 1 = dense) or the granularity G (dense FFN width over
expert width). A law is a form (moex.scaling.forms: the loss, parameters, FLOPs and
candidates of each) plus coefficients. Sources (shared/REFERENCES.md lists the same numbers):

  chinchilla    Hoffmann et al. 2022 (arXiv 2203.15556), approach 3 (chinchilla form).
  epoch         Besiroglu et al. 2024 (arXiv 2404.10102), the refit of approach 3 on the
                data recovered from Hoffmann et al.'s figure; the chinchilla form.
  krajewski     Krajewski et al. 2024 (arXiv 2402.07871), the E = 64 fit (krajewski form).
  ludziejewski  Ludziejewski et al. 2025 (arXiv 2502.05172), the joint MoE law.

Fitted laws (moex.scaling.fit) use the chinchilla form per family or the ludziejewski form
over families with different E.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moex.scaling import forms


@dataclasses.dataclass(frozen=True)
class Law:
  """A loss law: its form, coefficients, source and the ranges it was fitted on.

  `ranges` maps "n" (active parameters), "d" (tokens), "e" (expansion) to (low, high); a
  planner request outside them is an extrapolation (warned, not refused). Only ranges the
  source states are given.
  """

  name: str
  form: str  # a key of forms.FORMS
  coef: dict[str, float]
  source: str
  ranges: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

  @property
  def unit(self) -> forms.Form:
    """The law's form: what it computes and how the planner uses it."""
    return forms.FORMS[self.form]

  def loss(self, n, d, e=1.0, g=1.0) -> np.ndarray:
    """Predicted loss at `n` parameters (as the form counts N: active, or krajewski's total),
    tokens `d`, expansion `e`, granularity `g`."""
    return self.unit.loss(self.coef, np.asarray(n, float), np.asarray(d, float), e, g)

  @property
  def moe(self) -> bool:
    return self.unit.moe


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
