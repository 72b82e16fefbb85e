"""Upcycling initializations: one feed-forward block's weights in, an MoE block's out (NumPy).

Shape letters: D model width, F hidden width (the dense FFN's or an expert's), E experts,
M copies (granular: experts per shard; expand: copies per source expert).
Every function takes a numpy Generator, so a seed fixes the result; weights are float32.

| method   | experts                                                     | router          |
|----------|-------------------------------------------------------------|-----------------|
| copy     | E exact copies of the dense FFN (Komatsuzaki et al. 2022)   | N(0, std)       |
| noise    | copies; per expert a fraction of each matrix's entries       | N(0, std)       |
|          | replaced by N(0, sigma) (OLMoE's ablation)                  |                 |
| drop     | copies; per expert a fraction r of the hidden units (gate/up | N(0, std)       |
|          | columns, down rows) drawn from N(mean, std) of the dense     |                 |
|          | matrix (Drop-Upcycling, Nakamura et al. 2025)               |                 |
| granular | expert c*G + s = shard s (hidden units s*F/G .. (s+1)*F/G)   | N(0, std) per   |
|          | of the dense FFN, down scaled (He et al. 2024)              | copy c, shared  |
|          |                                                             | by its G shards |
| expand   | an MoE's E experts -> M*E: expert j = source expert j mod E  | column j =      |
|          |                                                             | source's j mod E|
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class DenseFFN(NamedTuple):
  """A dense SwiGLU block's weights."""

  gate_DxF: np.ndarray
  up_DxF: np.ndarray
  down_FxD: np.ndarray


class MoEFFN(NamedTuple):
  """An MoE block's routed weights: the router kernel and the experts."""

  router_DxE: np.ndarray
  gate_ExDxF: np.ndarray
  up_ExDxF: np.ndarray
  down_ExFxD: np.ndarray


def _f32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def fresh_router(d_model: int, num_experts: int, std: float,
                 rng: np.random.Generator) -> np.ndarray:
  """A newly initialized router kernel [D, E], N(0, std) (OLMoE upcycled with 0.02)."""
  return _f32(rng.normal(0.0, std, (d_model, num_experts)))


def _tile(w: np.ndarray, num_experts: int) -> np.ndarray:
  return np.repeat(_f32(w)[None], num_experts, axis=0)


def copy(dense: DenseFFN, num_experts: int, router_std: float,
         rng: np.random.Generator) -> MoEFFN:
  """Every expert an exact copy of the dense FFN; a fresh router."""
  d = dense.gate_DxF.shape[0]
  return MoEFFN(fresh_router(d, num_experts, router_std, rng),
                *(_tile(w, num_experts) for w in dense))


def noise(dense: DenseFFN, num_experts: int, router_std: float, fraction: float, std: float,
          rng: np.random.Generator) -> MoEFFN:
  """copy, then in each expert round(fraction * size) entries of each matrix, chosen without
  replacement, replaced by N(0, sigma): sigma = `std`, or when 0 that dense matrix's own
  standard deviation."""
  moe = copy(dense, num_experts, router_std, rng)
  for w_ExRxC, src in zip(moe[1:], dense):
    sigma = std or float(np.std(src))
    size = src.size
    n = round(fraction * size)
    for e in range(num_experts):
      flat = w_ExRxC[e].reshape(-1)  # a view: writes land in the expert
      flat[rng.choice(size, n, replace=False)] = rng.normal(0.0, sigma, n)
  return moe


def drop(dense: DenseFFN, num_experts: int, router_std: float, ratio: float,
         rng: np.random.Generator) -> MoEFFN:
  """Drop-Upcycling: copy, then per expert round(ratio * F) hidden units chosen without
  replacement are re-initialized, the same units in gate, up (columns) and down (rows), from
  a normal with the mean and standard deviation of that dense matrix."""
  moe = copy(dense, num_experts, router_std, rng)
  f = dense.gate_DxF.shape[1]
  n = round(ratio * f)
  stats = [(float(np.mean(w)), float(np.std(w))) for w in dense]
  for e in range(num_experts):
    units = rng.choice(f, n, replace=False)
    for w_ExRxC, (mean, std), axis in zip(moe[1:], stats, (1, 1, 0)):
      shape = list(w_ExRxC.shape[1:])
      shape[axis] = n
      fresh = rng.normal(mean, std, shape)
      if axis == 1:
        w_ExRxC[e][:, units] = fresh
      else:
        w_ExRxC[e][units, :] = fresh
  return moe


def granular(dense: DenseFFN, num_experts: int, granularity: int, router_std: float,
             scale: float, rng: np.random.Generator) -> MoEFFN:
  """Fine-grained upcycling: the dense FFN split along F into G shards of F/G units, E = G*M
  experts, expert c*G + s a copy of shard s with its down projection times `scale`; the
  router is N(0, std) per copy c, its column repeated for the G experts of that copy (one
  virtual group: one full copy of the dense FFN, tied logits).

  SwiGLU is a sum over hidden units, so the G shards of one copy sum to the dense FFN; a
  router that picks whole virtual groups with weights summing to routed_scaling per token
  then outputs routed_scaling / G times the dense FFN, which scale = G / routed_scaling
  makes exact (moex/upcycle.py checks which routers do).
  """
  g = granularity
  d = dense.gate_DxF.shape[0]
  copies = num_experts // g
  shard = lambda x, axis: np.stack(np.split(_f32(x), g, axis=axis))  # [G, ...]
  gate_GxDxW, up_GxDxW = shard(dense.gate_DxF, 1), shard(dense.up_DxF, 1)
  down_GxWxD = shard(dense.down_FxD, 0) * np.float32(scale)
  tile = lambda x: np.tile(x, (copies, 1, 1))  # expert c*G + s = shard s
  router_DxM = fresh_router(d, copies, router_std, rng)
  return MoEFFN(np.repeat(router_DxM, g, axis=1), tile(gate_GxDxW), tile(up_GxDxW),
                tile(down_GxWxD))


def expand(moe: MoEFFN, num_experts: int) -> MoEFFN:
  """An MoE's E experts -> num_experts = M * E: expert j (and router column j) is the
  source's j mod E. Every expert computes a source expert; softmax router probabilities
  summed over the M copies of an expert equal the source's."""
  m = num_experts // moe.gate_ExDxF.shape[0]
  return MoEFFN(np.tile(_f32(moe.router_DxE), (1, m)),
                *(np.tile(_f32(w), (m, 1, 1)) for w in moe[1:]))


def expand_bias(bias_E: np.ndarray | None, num_experts: int) -> np.ndarray:
  """The sigmoid_bias router's bias for `expand`: the source's, tiled like its columns (zeros
  when the source has none)."""
  if bias_E is None:
    return np.zeros((num_experts,), np.float32)
  return np.tile(_f32(bias_E), num_experts // bias_E.shape[0])
