"""moex.scaling.plan and laws: the planner against the papers' own tables, inference-aware
optima, memory caps, range warnings and the written experiment config.

Tolerances against published tables. The papers computed their tables from unrounded
coefficients; REFERENCES.md and the papers print them to 3-4 significant digits, and the
exponents' last digit alone moves the optimum by about 1% (Ludziejewski) and the loss by
about 0.02 (Krajewski). So each check asks two things: the planner's value is within the
stated tolerance of the printed one, and the printed value lies inside the envelope the
planner gives when every coefficient moves by half a unit of its last printed digit
(linear error propagation, `envelope`). Nothing is loosened beyond that envelope.
"""

import dataclasses
import importlib.util
import math

import ml_collections
import pytest

from moex import config as config_lib
from moex.model import params
from moex.scaling import commands, laws, plan
from moex.scaling.runs import ScalingError

LUD = laws.PUBLISHED["ludziejewski"]
KRA = laws.PUBLISHED["krajewski"]


def envelope(law: laws.Law, value) -> tuple[float, float]:
  """value(law) +- sum_k |d value / d c_k| x half a printed unit of c_k."""
  center, spread = value(law), 0.0
  for k, c in law.coef.items():
    h = laws.printed_half_unit(c)
    up = value(dataclasses.replace(law, coef={**law.coef, k: c + h}))
    down = value(dataclasses.replace(law, coef={**law.coef, k: c - h}))
    spread += abs(up - down) / 2
  return center - spread, center + spread


# Ludziejewski et al. 2025, Table 1: compute-optimal (N_act, D) at 1e20 FLOPs, C = 6 N D.
@pytest.mark.parametrize("e,n_printed,d_printed", [(1, 1.73e9, 9.6e9), (8, 0.99e9, 16.9e9),
                                                   (32, 0.68e9, 24.7e9)])
def test_ludziejewski_table1(e, n_printed, d_printed):
  best = plan.optimum_at(LUD, 1e20, e, 1.0)
  # Within 1% (the planner gives 1.727, 0.990, 0.674 B and 9.65, 16.84, 24.72 B tokens);
  # 0.68 and 16.9 are the two printed values off in their last digit, both inside the
  # coefficient-rounding envelope below.
  assert best.n_active == pytest.approx(n_printed, rel=0.01)
  assert best.tokens == pytest.approx(d_printed, rel=0.01)
  low, high = envelope(LUD, lambda law: plan.optimum_at(law, 1e20, e, 1.0).n_active)
  assert low <= n_printed <= high
  low, high = envelope(LUD, lambda law: plan.optimum_at(law, 1e20, e, 1.0).tokens)
  assert low <= d_printed <= high


# Krajewski et al. 2024, Table 2: 64x100M (4.37B tokens, G 8, 2.95e18 FLOPs, loss 3.133)
# and 64x1B (28.9B, G 16, 1.93e20, 2.491); FLOPs by their per-block count.
@pytest.mark.parametrize("n_printed,d_printed,g_printed,f_printed,loss_printed", [
    (1e8, 4.37e9, 8, 2.95e18, 3.133), (1e9, 28.9e9, 16, 1.93e20, 2.491)])
def test_krajewski_table2(n_printed, d_printed, g_printed, f_printed, loss_printed):
  best, _ = plan.compute_optimal(KRA, f_printed)
  assert best.granularity == g_printed  # exact, over G in 1, 2, ..., 64
  # "100M"/"1B" name the active size; the planner's optimum is 1.025e8 / 1.021e9.
  assert best.n_active == pytest.approx(n_printed, rel=0.03)
  # The table's tokens are its FLOPs spent by the named active size: 4.379e9 and 2.888e10.
  tokens = plan.tokens_for(KRA, n_printed, f_printed, 64.0, g_printed)
  assert tokens == pytest.approx(d_printed, rel=0.005)
  # The loss at that point is 3.1094 / 2.4717: 0.024 / 0.019 below the printed one, inside
  # the +-0.04 that rounding alpha and beta to 3 decimals allows (ln N x dN^-alpha ...).
  loss = lambda law: float(plan.predicted(law, n_printed, tokens, 64.0, g_printed))
  assert loss(KRA) == pytest.approx(loss_printed, abs=0.025)
  low, high = envelope(KRA, loss)
  assert low <= loss_printed <= high


def test_chinchilla_budget_is_spent_and_optimal():
  best, _ = plan.compute_optimal(laws.PUBLISHED["epoch"], 1e22)
  assert 6 * best.n_active * best.tokens == pytest.approx(1e22, rel=1e-9)
  for factor in (0.8, 1.25):  # moving N either way along the isoFLOP line costs loss
    assert plan.at(laws.PUBLISHED["epoch"], best.n_active * factor, 1e22, 1, 1).loss > best.loss


def test_inference_aware_is_smaller_longer_and_cheaper():
  law = laws.PUBLISHED["chinchilla"]
  best, _ = plan.compute_optimal(law, 1e21)
  aware = plan.inference_aware(law, best, 1e12)
  assert aware.n_active < best.n_active and aware.tokens > best.tokens
  assert float(law.loss(aware.n_active, aware.tokens)) == pytest.approx(best.loss, abs=1e-9)
  assert aware.total_flops < plan.with_inference(law, best, 1e12).total_flops
  none = plan.inference_aware(law, best, 0.0)  # no inference: back to the optimum
  assert none.n_active == pytest.approx(best.n_active, rel=1e-3)


def test_memory_caps_total_parameters():
  free, _ = plan.compute_optimal(LUD, 1e21)
  budget = free.n_total * 2 / 2 / 2**30  # GiB for half the free optimum's parameters at bf16
  capped, _ = plan.compute_optimal(LUD, 1e21, memory_bytes=budget * 2**30)
  assert capped.n_total * 2 <= budget * 2**30 * (1 + 1e-6)
  assert capped.loss > free.loss
  with pytest.raises(ScalingError, match="^--memory_gb: no candidate model fits"):
    plan.compute_optimal(LUD, 1e21, memory_bytes=1e3)


def test_range_warnings_name_the_value_and_source():
  text, _ = commands.plan_budget("chinchilla", 1e27)
  warnings = [line for line in text.splitlines() if line.startswith("warning:")]
  assert any("active parameters" in w and "Hoffmann" in w for w in warnings)
  text, _ = commands.plan_budget("chinchilla", 1e21)
  assert "warning:" not in text


def test_plan_text_reports_both_optima():
  text, best = commands.plan_budget("ludziejewski", 1e20, inference_tokens=1e12,
                                    experts=(1, 8, 32))
  assert "compute-optimal: N_active 6.74e+08" in text and ", E 32," in text
  assert "inference-aware (1e+12 tokens served, same loss)" in text
  assert best.experts == 32


@pytest.mark.parametrize("bad,match", [
    ("kaplan", "^--law: 'kaplan' is not one of"),
    ("fitted:/nonexistent.json", "^--law=fitted:/nonexistent.json: cannot read"),
])
def test_bad_law_is_one_line(bad, match):
  with pytest.raises(ScalingError, match=match) as e:
    commands.load_law(bad)
  assert "\n" not in str(e.value)


def test_bad_budget_is_one_line():
  with pytest.raises(ScalingError, match="^--flops: must be positive"):
    plan.compute_optimal(LUD, -1.0)


@pytest.mark.parametrize("law_name", ["chinchilla", "ludziejewski", "krajewski"])
def test_written_config_trains_the_planned_size(tmp_path, law_name):
  law = laws.PUBLISHED[law_name]
  best, _ = plan.compute_optimal(law, 1e20, (1, 8))
  source = commands.experiment_config(best, law, 64, 1024, 32768, "python -m moex.scaling plan")
  path = tmp_path / "planned.py"
  path.write_text(source)
  spec = importlib.util.spec_from_file_location("planned", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = config_lib.validate(ml_collections.ConfigDict(module.get_config()))
  active = sum(c.active for c in params.counts(cfg).values())
  assert active == pytest.approx(best.n_active, rel=0.1)
  assert cfg.train.steps == math.ceil(best.tokens / (64 * 1024))
  if law_name == "krajewski":
    assert (cfg.moe.num_experts, cfg.moe.top_k) == (64 * best.granularity, best.granularity)
  elif law_name == "ludziejewski":
    assert (cfg.moe.num_experts, cfg.moe.top_k) == (best.experts, 1)
  else:
    assert not cfg.model.moe_layers
