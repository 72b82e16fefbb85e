"""moex.scaling.fit: recovering known laws from synthetic runs (with noise), robustness of
the Huber loss, bootstrap intervals, refusals."""

import numpy as np
import pytest

from moex.scaling import fit, forms, laws, plan
from moex.scaling.runs import RunPoint, ScalingError

EPOCH = laws.PUBLISHED["epoch"]
LUD = laws.PUBLISHED["ludziejewski"]


def synthetic(law: laws.Law, noise: float, seed: int = 0, expansions=(1.0,),
              sizes=np.geomspace(1e8, 3e9, 5), tokens=np.geomspace(2e9, 6e10, 4)):
  """Runs on an N x D grid per expansion E with log-normal noise on the loss."""
  rng = np.random.default_rng(seed)
  runs = []
  for e in expansions:
    for n in sizes:
      for d in tokens:
        loss = float(law.loss(n, d, e)) * float(np.exp(rng.normal(0, noise)))
        runs.append(RunPoint(f"e{e:g}_n{n:.2g}_d{d:.2g}", n, n, d, 6 * n * d, loss,
                             int(e), 1, "byte | stdlib"))
  return runs


def test_recovers_chinchilla_coefficients_with_noise():
  runs = synthetic(EPOCH, noise=0.002)
  f = fit.fit(runs, bootstrap=10, keep=25, bootstrap_keep=3)
  c = f.law.coef
  assert f.law.form == "chinchilla"
  assert c["alpha"] == pytest.approx(EPOCH.coef["alpha"], abs=0.03)
  assert c["beta"] == pytest.approx(EPOCH.coef["beta"], abs=0.03)
  assert c["E"] == pytest.approx(EPOCH.coef["E"], rel=0.03)
  far = float(EPOCH.loss(6e9, 1.2e11))  # twice the largest N and D: an extrapolation
  assert float(f.law.loss(6e9, 1.2e11)) == pytest.approx(far, rel=0.005)
  for k in ("alpha", "beta", "E"):
    low, high = f.ci[k]
    assert low <= c[k] <= high and low <= EPOCH.coef[k] <= high, (k, f.ci[k])
  assert f.law.ranges["n"] == pytest.approx((1e8, 3e9))


def test_exact_data_fits_exactly():
  f = fit.fit(synthetic(EPOCH, noise=0.0), bootstrap=0, keep=25)
  for k, v in EPOCH.coef.items():
    assert f.law.coef[k] == pytest.approx(v, rel=0.02), k


def test_huber_ignores_an_outlier_that_least_squares_follows():
  runs = synthetic(EPOCH, noise=0.001)
  bad = runs[7]
  broken = runs[:7] + [RunPoint(bad.workdir, bad.n_active, bad.n_total, bad.tokens, bad.flops,
                                bad.loss * 1.3, 1, 1, bad.data)] + runs[8:]
  clean = fit.fit(runs, bootstrap=0, keep=25).law.coef
  robust = fit.fit(broken, bootstrap=0, keep=25).law.coef
  squares = fit.fit(broken, bootstrap=0, delta=10.0, keep=25).law.coef  # Huber = least squares
  assert abs(robust["alpha"] - clean["alpha"]) < 0.02
  assert abs(squares["alpha"] - clean["alpha"]) > 2 * abs(robust["alpha"] - clean["alpha"])


def test_recovers_the_joint_law_over_expansions():
  runs = synthetic(LUD, noise=0.001, expansions=(1.0, 8.0), sizes=np.geomspace(1e8, 2e9, 4),
                   tokens=np.geomspace(2e9, 4e10, 3))
  f = fit.fit(runs, bootstrap=0, keep=20)
  assert f.law.form == "ludziejewski"
  for e in (1.0, 8.0):  # the effective exponents and the loss of each family
    le = np.log(forms.e_hat(e, forms.E_START, forms.E_MAX))
    for base, slope in (("alpha", "gamma"), ("beta", "zeta")):
      got = f.law.coef[base] + f.law.coef[slope] * le
      want = LUD.coef[base] + LUD.coef[slope] * le
      assert got == pytest.approx(want, abs=0.03), (e, base)
    far = float(LUD.loss(4e9, 8e10, e))
    assert float(f.law.loss(4e9, 8e10, e)) == pytest.approx(far, rel=0.005)


def test_compute_multiplier():
  moe = laws.Law("moe", "chinchilla", {**EPOCH.coef, "A": EPOCH.coef["A"] / 2}, "test")
  assert plan.compute_multiplier(EPOCH, EPOCH, 1e21) == pytest.approx(1.0, rel=1e-4)
  m = plan.compute_multiplier(EPOCH, moe, 1e21)
  dense_flops = m * 1e21
  assert m > 1
  assert plan.frontier_loss(EPOCH, dense_flops) == pytest.approx(plan.frontier_loss(moe, 1e21),
                                                                 abs=1e-6)


@pytest.mark.parametrize("expansions,count,match", [
    ((1.0,), 4, "^fit: 4 runs for the 5-coefficient chinchilla law"),
    ((1.0, 8.0), 8, "^fit: 8 runs for the 9-coefficient ludziejewski law")])
def test_too_few_runs_is_one_line(expansions, count, match):
  runs = synthetic(EPOCH, 0.0, expansions=expansions)
  per = count // len(expansions)
  runs = [r for e in expansions for r in [x for x in runs if x.expansion == e][:per]]
  with pytest.raises(ScalingError, match=match):
    fit.fit(runs, bootstrap=0)
