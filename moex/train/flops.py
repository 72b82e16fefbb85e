"""Model FLOPs and MFU, counted the honest way: only the work a token must do.

Per trained token: 6 x active parameters (forward 2, backward 4 FLOPs per weight) where
active = embedding + unembedding + attention projections + per MoE layer (router + K
routed experts + shared experts) + per dense layer its SwiGLU; plus causal attention's
quadratic term, 6 x L x H x A per layer per token (QK^T and AV, 2 FLOPs per multiply-add,
halved for the causal mask, times 3 for training). Capacity padding, dropped-token
buffers, the padded expert-parallel buffers and whatever a backend wastes are never
counted (MaxText's `calculate_tflops_training_per_device` convention). Norms, softmaxes
and the optimizer are not counted either.

MFU = model FLOPs per second / the devices' peak. Peaks: a table of bf16 dense figures for
common accelerators, and on CPU a float32 matmul probe: the best of the probes cached for
this machine, probed again when a run's throughput implies the cached figure is too low.
Benchmarks measure the peak in their own process instead (measure_matmul_peak), before and
after their timed runs, so their MFU is a ratio of one sitting.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

from moex import config as config_lib
from moex.config import Config
from moex.model import params

# bf16 dense peak per chip (TFLOP/s), from the vendors' data sheets.
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5": 459.0,  # v5p
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "TPU v6e": 918.0,
    "NVIDIA A100": 312.0,
    "NVIDIA H100": 989.0,  # SXM; the PCIe card is 756
    "NVIDIA H200": 989.0,
}


def active_params_per_token(cfg: Config) -> dict[str, int]:
  """Parameters a token's forward pass multiplies with, by part (params.MATMUL_PARTS)."""
  counts = params.counts(cfg)
  return {part: counts[part].active for part in params.MATMUL_PARTS}


def train_flops_per_token(cfg: Config) -> float:
  """Model FLOPs to train on one token (forward + backward)."""
  m = cfg.model
  n = sum(active_params_per_token(cfg).values())
  attention_quadratic = 6 * m.num_layers * cfg.data.seq_len * m.num_heads * m.head_dim / 2
  return 6.0 * n + attention_quadratic


def _cache_path() -> str:
  return os.fspath(config_lib.cache_root() / "cpu_peak.json")


def _cpu_key() -> str:
  return f"{platform.processor() or platform.machine()}|{os.cpu_count()}|jax {jax.__version__}"


class Probe(NamedTuple):
  """One matmul peak measurement: the best, median and worst of its repeats (FLOP/s)."""

  best: float
  median: float
  worst: float

  @property
  def spread(self) -> float:
    """(best - worst) / best: near 0 on an idle machine, large when the cores are shared."""
    return (self.best - self.worst) / self.best


def measure_matmul_peak(size: int = 2048, repeats: int = 5) -> Probe:
  """Float32 FLOP/s of a size^3 matmul on the default device, in this process, now."""
  a = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  rates = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    rates.append(2 * size ** 3 / (time.perf_counter() - t))
  rates.sort()
  return Probe(best=rates[-1], median=rates[len(rates) // 2], worst=rates[0])


# Probes a cache keeps (newest last); its peak is the best of them, so one probe taken while
# another job shared the cores cannot lower it.
_KEPT_PROBES = 8


def _read_cache(path: str, key: str) -> list[dict]:
  try:
    with open(path) as f:
      cached = json.load(f)
  except (OSError, ValueError):
    return []
  if cached.get("key") != key:
    return []
  if "probes" not in cached and "flops" in cached:  # written by an older moex: one number
    return [{"best": float(cached["flops"]), "spread": None, "matmul": cached.get("matmul")}]
  return list(cached.get("probes", []))


def cpu_peak_flops(size: int = 2048, repeats: int = 5, remeasure: bool = False) -> float:
  """Float32 matmul FLOP/s of this CPU: the best of every probe cached for this machine.

  The first call measures (best of `repeats`) and caches in $MOEX_CACHE_DIR/cpu_peak.json
  (default ~/.cache/moex/); later calls read the cache. `remeasure` adds a fresh probe;
  the cache keeps the last _KEPT_PROBES with their spreads, and the peak is their best.
  """
  path, key = _cache_path(), _cpu_key()
  probes = _read_cache(path, key)
  if probes and not remeasure:
    return max(float(p["best"]) for p in probes)
  probe = measure_matmul_peak(size, repeats)
  probes = (probes + [{"best": probe.best, "median": probe.median, "spread": probe.spread,
                       "matmul": size, "repeats": repeats, "time": time.time()}])[-_KEPT_PROBES:]
  peak = max(float(p["best"]) for p in probes)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump({"key": key, "flops": peak, "probes": probes}, f, indent=1)
  os.replace(tmp, path)
  logging.info("CPU peak: probe %.1f GFLOP/s (float32 %d^3 matmul, spread %.0f%% over %d "
               "repeats); peak %.1f GFLOP/s, best of %d probes cached in %s", probe.best / 1e9,
               size, 100 * probe.spread, repeats, peak / 1e9, len(probes), path)
  return peak


def device_peak_flops(device: jax.Device | None = None) -> float | None:
  """Peak FLOP/s of one device, or None when its kind is unknown."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return cpu_peak_flops() / max(len(jax.local_devices()), 1)  # simulated devices share it
  kind = device.device_kind
  for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
    if kind.startswith(name):
      return PEAK_TFLOPS[name] * 1e12
  logging.warning("no peak FLOP/s known for %r: MFU not reported", kind)
  return None


# On CPU, a train step's MFU above this fraction of the cached peak means the peak is more
# likely too low (probed while another job shared the cores) than the step that good: XLA:CPU
# train steps measured here reach 20-50% of the matmul peak probed in the same run
# (WORKSPACE.md "Train step and MFU"); a peak probed at half speed reads 40-100%.
SUSPECT_CPU_MFU = 0.75


class MFU:
  """Turns tokens/s into model TFLOP/s per device and MFU.

  On CPU the peak is the cached probe (cpu_peak_flops). When a measured throughput implies
  an MFU above SUSPECT_CPU_MFU, the probe is taken again (once per MFU object, with a
  warning) and the better peak is used from then on. A `peak` given (FLOP/s per device,
  e.g. a benchmark's in-run probe) is used as it is.
  """

  def __init__(self, cfg: Config, num_devices: int, peak: float | None = None):
    self.flops_per_token = train_flops_per_token(cfg)
    self.num_devices = num_devices
    self.peak = peak or device_peak_flops()
    self._rechecked = peak is not None or jax.devices()[0].platform != "cpu"

  def _recheck(self, mfu: float) -> None:
    self._rechecked = True
    old = self.peak
    logging.warning("MFU %.0f%% against the cached CPU peak (%.1f GFLOP/s per device) is "
                    "implausibly high; measuring the peak again", 100 * mfu, old / 1e9)
    cpu_peak_flops(remeasure=True)
    self.peak = device_peak_flops()
    logging.warning("CPU peak now %.1f GFLOP/s per device (was %.1f)", self.peak / 1e9,
                    old / 1e9)

  def __call__(self, tokens_per_sec: float) -> dict:
    per_device = self.flops_per_token * tokens_per_sec / self.num_devices
    if self.peak and not self._rechecked and per_device / self.peak > SUSPECT_CPU_MFU:
      self._recheck(per_device / self.peak)
    return {"model_tflops_per_sec_per_device": per_device / 1e12,
            "mfu": per_device / self.peak if self.peak else None}
