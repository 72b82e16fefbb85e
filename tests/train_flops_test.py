"""moex/train/flops.py: model FLOPs count only active work; MFU and peaks."""

import json
import logging

import jax
import pytest
from flax import nnx

from experiments import tiny
from moex import config as config_lib
from moex.model import params
from moex.model.decoder import Decoder
from moex.train import flops, footprint


def _cfg(**moe):
  cd = tiny.get_config()
  for k, v in moe.items():
    cd.moe[k] = v
  return config_lib.validate(cd, vocab_size=259)


def test_flops_per_token_by_hand():
  cfg = _cfg()
  d, v, layers, e, k, f = 128, 259, 4, 8, 2, 256
  attn = d * 32 * (2 * 4 + 2 * 2)
  params = 2 * v * d + layers * (attn + d * e + k * 3 * d * f)
  quadratic = 6 * layers * 256 * 4 * 32 / 2
  assert flops.train_flops_per_token(cfg) == pytest.approx(6 * params + quadratic)


def test_capacity_factor_and_dispatch_do_not_change_model_flops():
  base = flops.train_flops_per_token(_cfg())
  assert flops.train_flops_per_token(_cfg(capacity_factor=2.0)) == base
  assert flops.train_flops_per_token(_cfg(dispatch="dropless")) == base
  assert flops.train_flops_per_token(_cfg(top_k=4)) > base  # more active experts


def test_mfu_uses_per_device_peak(monkeypatch):
  monkeypatch.setattr(flops, "device_peak_flops", lambda device=None: 1e12)
  mfu = flops.MFU(_cfg(), num_devices=2)
  r = mfu(tokens_per_sec=1000.0)
  per_device = mfu.flops_per_token * 1000.0 / 2
  assert r["model_tflops_per_sec_per_device"] == pytest.approx(per_device / 1e12)
  assert r["mfu"] == pytest.approx(per_device / 1e12)


def test_peak_table_lookup():
  class Dev:
    platform = "gpu"
    device_kind = "NVIDIA H100 80GB HBM3"
  assert flops.device_peak_flops(Dev()) == 989e12
  Dev.device_kind = "TPU v5 lite"
  assert flops.device_peak_flops(Dev()) == 197e12
  Dev.device_kind = "Mystery chip"
  assert flops.device_peak_flops(Dev()) is None


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
  monkeypatch.setenv("MOEX_CACHE_DIR", str(tmp_path))
  first = flops.cpu_peak_flops(size=256, repeats=2)
  assert first > 0 and (tmp_path / "cpu_peak.json").exists()
  monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("re-measured"))
  assert flops.cpu_peak_flops(size=256) == first


def test_cpu_peak_keeps_the_best_probe_and_its_spread(tmp_path, monkeypatch):
  monkeypatch.setenv("MOEX_CACHE_DIR", str(tmp_path))
  probes = iter([flops.Probe(2e11, 1.5e11, 1e11), flops.Probe(4e11, 4e11, 3.9e11),
                 flops.Probe(3e11, 3e11, 3e11)])
  monkeypatch.setattr(flops, "measure_matmul_peak", lambda size, repeats: next(probes))
  assert flops.cpu_peak_flops() == 2e11
  assert flops.cpu_peak_flops(remeasure=True) == 4e11
  assert flops.cpu_peak_flops(remeasure=True) == 4e11  # a worse probe never lowers the peak
  assert flops.cpu_peak_flops() == 4e11
  cached = json.loads((tmp_path / "cpu_peak.json").read_text())
  assert [p["best"] for p in cached["probes"]] == [2e11, 4e11, 3e11]
  assert cached["probes"][0]["spread"] == pytest.approx(0.5)


def test_cpu_peak_reads_a_single_number_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("MOEX_CACHE_DIR", str(tmp_path))
  (tmp_path / "cpu_peak.json").write_text(json.dumps(
      {"key": flops._cpu_key(), "flops": 2.189e11, "matmul": 2048}))
  monkeypatch.setattr(flops, "measure_matmul_peak",
                      lambda size, repeats: flops.Probe(4.84e11, 4.8e11, 4.7e11))
  assert flops.cpu_peak_flops() == 2.189e11
  assert flops.cpu_peak_flops(remeasure=True) == 4.84e11


def test_mfu_remeasures_an_implausibly_low_cpu_peak(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("MOEX_CACHE_DIR", str(tmp_path))
  per_device = lambda peak: peak / len(jax.local_devices())
  (tmp_path / "cpu_peak.json").write_text(json.dumps(
      {"key": flops._cpu_key(), "flops": 1e11}))
  monkeypatch.setattr(flops, "measure_matmul_peak",
                      lambda size, repeats: flops.Probe(4e11, 4e11, 4e11))
  mfu = flops.MFU(_cfg(), num_devices=1)
  assert mfu.peak == per_device(1e11)
  plausible = 0.4 * mfu.peak / mfu.flops_per_token  # tokens/s at 40% MFU: kept as is
  assert mfu(plausible)["mfu"] == pytest.approx(0.4) and mfu.peak == per_device(1e11)
  with caplog.at_level(logging.WARNING, logger="absl"):
    out = mfu(0.8 * per_device(1e11) / mfu.flops_per_token)  # 80%: re-measured, once
  assert "implausibly high" in caplog.text
  assert mfu.peak == per_device(4e11) and out["mfu"] == pytest.approx(0.2)
  monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a: pytest.fail("re-measured"))
  mfu(0.9 * mfu.peak / mfu.flops_per_token)


def _every_part(qk_norm: str):
  """tiny with a dense first layer, shared experts and q/k norms (separate embed/unembed)."""
  cd = tiny.get_config()
  cd.model.first_dense_layers, cd.moe.num_shared_experts, cd.moe.d_shared = 1, 2, 64
  cd.model.qk_norm = qk_norm
  return config_lib.validate(cd, vocab_size=259)


@pytest.mark.parametrize("qk_norm", ["none", "head", "full"])
def test_the_counts_agree_with_footprint_and_the_module(qk_norm):
  cfg = _every_part(qk_norm)
  counts = params.counts(cfg)
  with nnx.use_eager_sharding(False):
    model = Decoder(cfg.model, cfg.moe, nnx.Rngs(0))
  own = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert sum(c.total for c in counts.values()) == own
  fp = footprint.footprint(cfg, 1)  # one device, float32: bytes / 4 are the elements
  assert fp.total_params == own
  assert {k: b // 4 for k, b in fp.param_bytes.items()} == {k: c.total for k, c in counts.items()}
  # The q/k norm scales are norms: elementwise, so no model FLOPs.
  m = cfg.model
  qk = {"none": 0, "head": 2 * m.head_dim, "full": (m.num_heads + m.num_kv_heads) * m.head_dim}
  assert counts["norms"].total == (2 * m.num_layers + 1) * m.d_model + m.num_layers * qk[qk_norm]
  assert flops.train_flops_per_token(cfg) == flops.train_flops_per_token(_every_part("none"))
