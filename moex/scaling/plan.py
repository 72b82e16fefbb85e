"""Planning a compute budget with a law: compute-optimal and inference-aware optima.

Compute-optimal: the (N, D[, E or G]) of least predicted loss whose training FLOPs equal the
budget C (each law's form counts its FLOPs: C = 6 N D, or krajewski's per-block count).
Over the form's candidate (E, G) pairs (E for ludziejewski, G for krajewski) the optimum is
taken; a memory budget caps the total parameters (bytes_per_param each). Nothing here asks
which form a law has: moex.scaling.forms answers for each.

Inference-aware (Sardana et al. 2024): at the compute-optimal plan's loss, the (N, D) that
minimizes training FLOPs + inference FLOPs (2 N per served token, a third of training's
6 N), for the same E or G: a smaller model trained on more tokens once inference is large.
"""

from __future__ import annotations

import dataclasses
import math

from scipy import optimize

from moex.scaling import laws
from moex.scaling.forms import LOG_N
from moex.scaling.runs import ScalingError

EXPERTS = (1, 2, 4, 8, 16, 32, 64)  # expansion E candidates of the joint law


@dataclasses.dataclass(frozen=True)
class Allocation:
  """One allocation of a training budget and what the law predicts for it."""

  n_active: float
  n_total: float
  tokens: float
  experts: float  # expansion E (1 = dense; 64 for krajewski)
  granularity: float  # G (krajewski); 1 otherwise
  loss: float
  train_flops: float
  inference_flops: float = 0.0

  @property
  def total_flops(self) -> float:
    return self.train_flops + self.inference_flops


def total_params(law: laws.Law, n_active, e: float):
  """Stored parameters of a model with `n_active` active ones at expansion `e`."""
  return law.unit.total_params(n_active, e)


def train_flops(law: laws.Law, n_active, tokens, e: float, g: float):
  """The law's training FLOPs convention."""
  return law.unit.train_flops(n_active, tokens, e, g)


def tokens_for(law: laws.Law, n_active: float, flops: float, e: float, g: float) -> float:
  """Tokens D that spend `flops` at `n_active` (the law's FLOPs are linear in D)."""
  return flops / float(train_flops(law, n_active, 1.0, e, g))


def predicted(law: laws.Law, n_active, tokens, e: float, g: float):
  """The law's loss at `n_active` active parameters (krajewski counts its N as the total)."""
  return law.unit.loss_at(law.coef, n_active, tokens, e, g)


def _n_bound(law: laws.Law, e: float, memory_bytes: float, bytes_per_param: float) -> float:
  """log of the largest active N whose total parameters fit the memory budget."""
  if memory_bytes <= 0:
    return LOG_N[1]
  return law.unit.max_log_active(e, memory_bytes / bytes_per_param)


def at(law: laws.Law, n_active: float, flops: float, e: float, g: float) -> Allocation:
  d = tokens_for(law, n_active, flops, e, g)
  return Allocation(n_active, float(total_params(law, n_active, e)), d, e, g,
              float(predicted(law, n_active, d, e, g)), flops)


def optimum_at(law: laws.Law, flops: float, e: float, g: float, memory_bytes: float = 0.0,
               bytes_per_param: float = 2.0) -> Allocation:
  """The compute-optimal plan at fixed E and G (N bounded by the memory budget)."""
  high = min(LOG_N[1], _n_bound(law, e, memory_bytes, bytes_per_param))
  if high <= LOG_N[0]:
    raise ScalingError(f"--memory_gb: no model of E={e:g} fits {memory_bytes / 2**30:.3g} GiB")
  res = optimize.minimize_scalar(lambda x: at(law, math.exp(x), flops, e, g).loss,
                                 bounds=(LOG_N[0], high), method="bounded",
                                 options={"xatol": 1e-6})
  return at(law, math.exp(res.x), flops, e, g)


def candidates(law: laws.Law, experts: tuple[float, ...]) -> list[tuple[float, float]]:
  """The (E, G) pairs a law chooses among."""
  return law.unit.candidates(experts, law.ranges)


def compute_optimal(law: laws.Law, flops: float, experts: tuple[float, ...] = EXPERTS,
                    memory_bytes: float = 0.0, bytes_per_param: float = 2.0
                    ) -> tuple[Allocation, list[Allocation]]:
  """The best plan over the law's (E, G) candidates, and the optimum at each of them."""
  if not (flops > 0 and math.isfinite(flops)):
    raise ScalingError(f"--flops: must be positive and finite, got {flops}")
  plans = []
  for e, g in candidates(law, experts):
    try:
      plans.append(optimum_at(law, flops, e, g, memory_bytes, bytes_per_param))
    except ScalingError:
      continue  # this E does not fit the memory budget
  if not plans:
    raise ScalingError(f"--memory_gb: no candidate model fits {memory_bytes / 2**30:.3g} GiB")
  return min(plans, key=lambda p: p.loss), plans


def tokens_for_loss(law: laws.Law, n_active: float, loss: float, e: float, g: float) -> float:
  """Tokens at which a model of `n_active` reaches `loss` (inf when it cannot)."""
  f = lambda x: float(predicted(law, n_active, math.exp(x), e, g)) - loss
  low, high = math.log(1e3), math.log(1e17)
  if f(high) > 0:
    return math.inf
  return math.exp(optimize.brentq(f, low, high, xtol=1e-10)) if f(low) > 0 else math.exp(low)


def inference_aware(law: laws.Law, best: Allocation, inference_tokens: float) -> Allocation:
  """Least training + inference FLOPs at `best`'s loss and E, G (Sardana et al.)."""
  e, g = best.experts, best.granularity

  def allocation(x: float) -> Allocation:
    n = math.exp(x)
    d = tokens_for_loss(law, n, best.loss, e, g)
    if not math.isfinite(d):
      return Allocation(n, math.inf, d, e, g, best.loss, math.inf, math.inf)
    train = float(train_flops(law, n, d, e, g))
    return Allocation(n, float(total_params(law, n, e)), d, e, g, best.loss, train,
                train / 3.0 * inference_tokens / d)

  cost = lambda x: min(allocation(x).total_flops, 1e300)  # inf: N too small to reach the loss
  res = optimize.minimize_scalar(lambda x: math.log(cost(x)),
                                 bounds=(math.log(best.n_active) - 8, math.log(best.n_active)),
                                 method="bounded", options={"xatol": 1e-6})
  return allocation(res.x)


def with_inference(law: laws.Law, p: Allocation, inference_tokens: float) -> Allocation:
  """`p` with the FLOPs of serving `inference_tokens` tokens added."""
  per_token = float(train_flops(law, p.n_active, 1.0, p.experts, p.granularity)) / 3.0
  return dataclasses.replace(p, inference_flops=per_token * inference_tokens)


def range_warnings(law: laws.Law, p: Allocation) -> list[str]:
  """One line per plan value outside the ranges the law was fitted on."""
  values = {"n": ("active parameters", p.n_active), "d": ("training tokens", p.tokens),
            "e": ("expansion E", p.experts)}
  out = []
  for key, (low, high) in law.ranges.items():
    what, v = values[key]
    if not low * (1 - 1e-9) <= v <= high * (1 + 1e-9):
      out.append(f"warning: {what} {v:.3g} outside the range {law.name} was fitted on "
                 f"[{low:.3g}, {high:.3g}] ({law.source}): an extrapolation")
  return out


def frontier_loss(law: laws.Law, flops: float, e: float = 1.0) -> float:
  """Compute-optimal loss at `flops` for expansion `e`."""
  return optimum_at(law, flops, e, 1.0).loss


def flops_for_loss(law: laws.Law, loss: float, e: float = 1.0) -> float:
  """Compute at which the compute-optimal model of expansion `e` reaches `loss` (inf when
  the law's irreducible loss is above it)."""
  f = lambda x: frontier_loss(law, math.exp(x), e) - loss
  low, high = math.log(1e6), math.log(1e40)
  if f(high) > 0:
    return math.inf
  return math.exp(optimize.brentq(f, low, high, xtol=1e-8))


def compute_multiplier(dense: laws.Law, moe: laws.Law, flops: float, e_dense: float = 1.0,
                       e_moe: float = 1.0) -> float:
  """The dense compute that reaches the MoE's compute-optimal loss at `flops`, over `flops`
  (each family on its own law's frontier; E as the laws take it)."""
  return flops_for_loss(dense, frontier_loss(moe, flops, e_moe), e_dense) / flops
