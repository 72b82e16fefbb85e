"""Next-token sampling from logits: greedy, temperature, top-k, top-p (nucleus).

Shape letters: B sequences, V vocabulary. Everything here runs inside the jitted decode
step. Randomness is keyed per sequence and step (`keys`): sequence i's t-th token depends
only on (seed, i, t) and its logits, so the same seed gives the same text whatever the
batch size or the other prompts of its batch.

A sampling method is one `Method` in METHODS (its flag, its default, its range and its
filter on the logits) and one field of `Sampling` with that default: moex.generate defines
a flag per entry, `Sampling.check` refuses out-of-range values in one line, and `filtered`
applies every filter that is on, in table order, after the temperature.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from moex import errors


class SamplingError(ValueError, errors.Refusal):
  """A sampling value out of range (one line naming the flag)."""


@dataclasses.dataclass(frozen=True)
class Method:
  """One way of shaping the next-token distribution, and its flag."""

  name: str  # the Sampling field and the --flag
  default: float | int  # the value that leaves the distribution as it is (its type: the flag's)
  help: str
  valid: Callable[[float], bool]  # only called on finite values
  expected: str  # the valid range in words, for the refusal
  # x_BxV (logits / temperature), value -> x_BxV with the dropped tokens at -inf; None for
  # the temperature itself (it divides the logits; 0 = greedy).
  filter: Callable[[jax.Array, float], jax.Array] | None = None


def _top_k(x_BxV: jax.Array, k: int) -> jax.Array:
  """Keeps the k most likely tokens (ties at the k-th are kept)."""
  if k >= x_BxV.shape[-1]:
    return x_BxV
  kth_Bx1 = jax.lax.top_k(x_BxV, k)[0][:, -1:]
  return jnp.where(x_BxV < kth_Bx1, -jnp.inf, x_BxV)


def _top_p(x_BxV: jax.Array, p: float) -> jax.Array:
  """Keeps the smallest set of most likely tokens with mass >= p (ties at the threshold)."""
  sorted_BxV = jnp.sort(x_BxV, axis=-1)[:, ::-1]
  p_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  before_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV  # mass of the more likely tokens
  keep_BxV = before_BxV < p  # the most likely token is always kept
  threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(x_BxV < threshold_Bx1, -jnp.inf, x_BxV)


METHODS = (
    Method("temperature", 0.0, "0 = greedy; else the sampling temperature.",
           lambda t: t >= 0, ">= 0 (0 = greedy)"),
    Method("top_k", 0, "Sample among the k most likely tokens (0 = all).",
           lambda k: k >= 0, ">= 0 (0 = all tokens)", _top_k),
    Method("top_p", 1.0, "Sample among the most likely tokens of total probability p "
           "(1 = all).", lambda p: 0 < p <= 1, "in (0, 1]", _top_p),
)
BY_NAME = {m.name: m for m in METHODS}


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen: one field per METHODS entry, its default off."""

  temperature: float = 0.0  # 0 = greedy (argmax); else logits / temperature are sampled
  top_k: int = 0  # keep the k most likely tokens (0 = all)
  top_p: float = 1.0  # keep the smallest set of most likely tokens with mass >= p (1 = all)

  def check(self) -> None:
    """SamplingError (a ValueError) with one line naming the flag for a value that is not
    finite or out of range."""
    for m in METHODS:
      value = getattr(self, m.name)
      if not math.isfinite(value):
        raise SamplingError(f"--{m.name}: must be finite and {m.expected}, got {value}")
      if not m.valid(value):
        raise SamplingError(f"--{m.name}: must be {m.expected}, got {value}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def keys(seed: jax.Array, sequence_B: jax.Array, step: jax.Array) -> jax.Array:
  """One PRNG key per sequence for decode step `step`: [B] keys."""
  base = jax.random.key(seed)
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(base, s), step))(
      sequence_B.astype(jnp.uint32))


def filtered(logits_BxV: jax.Array, s: Sampling) -> jax.Array:
  """Logits / temperature with the tokens every filter that is on drops set to -inf."""
  x_BxV = logits_BxV.astype(jnp.float32) / s.temperature
  for m in METHODS:
    value = getattr(s, m.name)
    if m.filter is not None and value != m.default:
      x_BxV = m.filter(x_BxV, value)
  return x_BxV


def sample(logits_BxV: jax.Array, keys_B: jax.Array, s: Sampling) -> jax.Array:
  """The next token of each sequence: int32 [B]."""
  if s.greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  x_BxV = filtered(logits_BxV, s)
  return jax.vmap(jax.random.categorical)(keys_B, x_BxV).astype(jnp.int32)
