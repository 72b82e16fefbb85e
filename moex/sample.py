"""Next-token sampling from logits: greedy, temperature, top-k, top-p (nucleus).

Shape letters: B sequences, V vocabulary. Everything here runs inside the jitted decode
step. Randomness is keyed per sequence and step (`keys`): sequence i's t-th token depends
only on (seed, i, t) and its logits, so the same seed gives the same text whatever the
batch size or the other prompts of its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen."""

  temperature: float = 0.0  # 0 = greedy (argmax); else logits / temperature are sampled
  top_k: int = 0  # keep the k most likely tokens (0 = all)
  top_p: float = 1.0  # keep the smallest set of most likely tokens with mass >= p (1 = all)

  def check(self) -> None:
    """ValueError with one line naming the flag when a value is out of range."""
    if not (self.temperature >= 0 and self.temperature < float("inf")):
      raise ValueError(f"--temperature: must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"--top_k: must be >= 0 (0 = all tokens), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"--top_p: must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def keys(seed: jax.Array, sequence_B: jax.Array, step: jax.Array) -> jax.Array:
  """One PRNG key per sequence for decode step `step`: [B] keys."""
  base = jax.random.key(seed)
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(base, s), step))(
      sequence_B.astype(jnp.uint32))


def filtered(logits_BxV: jax.Array, s: Sampling) -> jax.Array:
  """Logits / temperature with the tokens outside top-k and top-p set to -inf (ties at a
  threshold are kept)."""
  x_BxV = logits_BxV.astype(jnp.float32) / s.temperature
  if 0 < s.top_k < x_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(x_BxV, s.top_k)[0][:, -1:]
    x_BxV = jnp.where(x_BxV < kth_Bx1, -jnp.inf, x_BxV)
  if s.top_p < 1:
    sorted_BxV = jnp.sort(x_BxV, axis=-1)[:, ::-1]
    p_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV  # mass of the more likely tokens
    keep_BxV = before_BxV < s.top_p  # the most likely token is always kept
    threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    x_BxV = jnp.where(x_BxV < threshold_Bx1, -jnp.inf, x_BxV)
  return x_BxV


def sample(logits_BxV: jax.Array, keys_B: jax.Array, s: Sampling) -> jax.Array:
  """The next token of each sequence: int32 [B]."""
  if s.greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  x_BxV = filtered(logits_BxV, s)
  return jax.vmap(jax.random.categorical)(keys_B, x_BxV).astype(jnp.int32)
