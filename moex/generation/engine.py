"""The generation engine: a model's compiled prefill and decode step over the KV cache.

`Generator` runs prompts (token ids) in batches of a fixed size: left-padded to a common
width (a multiple of PROMPT_BUCKET, so few widths compile), one prefill fills the cache, then
one decode step per new token (moex/model/cache.py; both compiled once per shape, ahead of
time, the cache donated). Each sequence stops at its EOS or at max_new_tokens. Sampling
(moex/generation/sampling.py) runs inside the compiled calls.

Shape letters as in moex/model/cache.py: B sequences of a batch, T the tokens of one call
(the prompt width at prefill, 1 at a decode step), V vocabulary.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from moex import config as config_lib, errors
from moex.generation import sampling as sampling_lib
from moex.model import cache as kv_cache
from moex.moe import routing
from moex.parallel import sharding

PROMPT_BUCKET = 16  # prompt widths are rounded up to a multiple of this (fewer compiles)


class GenerateError(ValueError, errors.Refusal):
  """A one-line reason generation cannot proceed (names the flag, prompt or file)."""


def refuse_noncausal(cfg: config_lib.Config) -> None:
  """GenerateError for a router whose choices depend on later tokens."""
  if not routing.ROUTERS[cfg.moe.router].causal:
    raise GenerateError(
        f"moe.router={cfg.moe.router}: cannot generate: a token's routing depends on later "
        "tokens of its sequence (non-causal), which decoding one token at a time cannot "
        "reproduce")


@dataclasses.dataclass
class Completion:
  """One prompt's generation."""

  prompt: np.ndarray  # the prompt's token ids
  tokens: list[int]  # generated ids, EOS excluded
  stopped_by_eos: bool = False
  logits: list[np.ndarray] | None = None  # float32 [V] for every generated position


@dataclasses.dataclass
class Timing:
  """Wall time of the compiled calls, compilation excluded."""

  prefill_s: float = 0.0
  prefill_tokens: int = 0  # real prompt tokens (padding not counted)
  decode_s: float = 0.0
  decode_tokens: int = 0  # tokens produced by decode steps for live sequences
  compile_s: float = 0.0
  step_s: list[float] = dataclasses.field(default_factory=list)  # each decode step
  # With track_experts: the (MoE layer, expert) pairs each decode step used, i.e. whose
  # weights it had to read.
  step_experts: list[int] = dataclasses.field(default_factory=list)

  @property
  def prefill_tps(self) -> float:
    return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

  @property
  def decode_tps(self) -> float:
    return self.decode_tokens / self.decode_s if self.decode_s else 0.0


def check_prompts(prompts: Sequence[np.ndarray], max_new_tokens: int, cache_len: int) -> None:
  """GenerateError (one line) for an empty prompt, or one the cache cannot hold."""
  if max_new_tokens < 1:
    raise GenerateError(f"--max_new_tokens: must be >= 1, got {max_new_tokens}")
  if not prompts:
    raise GenerateError("no prompt: give --prompt=TEXT or --prompts_file=FILE")
  for i, p in enumerate(prompts):
    n = len(p)
    if n == 0:
      raise GenerateError(f"prompt {i} is empty: give it at least one token of text")
    if n >= cache_len:
      raise GenerateError(f"prompt {i} has {n} tokens, longer than the cache "
                          f"(--cache_len={cache_len} columns); raise --cache_len")
    if n + max_new_tokens > cache_len:
      raise GenerateError(f"prompt {i} has {n} tokens: with --max_new_tokens="
                          f"{max_new_tokens} it needs {n + max_new_tokens} cache columns, "
                          f"more than --cache_len={cache_len}")


def auto_cache_len(prompts: Sequence[np.ndarray], max_new_tokens: int) -> int:
  """A cache that holds the longest (bucketed) prompt plus the new tokens."""
  longest = max((len(p) for p in prompts), default=1)
  return _round_up(_round_up(longest, PROMPT_BUCKET) + max_new_tokens, 64)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


class Generator:
  """A model's compiled prefill and decode step for one batch size and cache length."""

  def __init__(self, cfg: config_lib.Config, graphdef, params, buffers, mesh: Mesh, *,
               batch_size: int, cache_len: int,
               sampling: sampling_lib.Sampling = sampling_lib.Sampling(), seed: int = 0,
               track_experts: bool = False, compiler_options: dict | None = None):
    refuse_noncausal(cfg)
    sampling.check()
    shards = sharding.batch_shards(cfg.mesh.rules, mesh)
    if batch_size < 1 or batch_size % shards:
      raise GenerateError(f"--batch_size: {batch_size} is not a positive multiple of the "
                          f"{shards} batch shards of the mesh (data x fsdp x expert)")
    self.cfg, self.mesh, self.graphdef = cfg, mesh, graphdef
    self.params, self.buffers = params, buffers
    self.batch_size, self.cache_len = batch_size, cache_len
    self.sampling, self.seed, self.track_experts = sampling, seed, track_experts
    self.compiler_options = compiler_options  # XLA options (tests: faster compiles)
    rules = cfg.mesh.rules
    self._batch1 = sharding.batch_sharding(rules, mesh, 1)
    self._batch2 = sharding.batch_sharding(rules, mesh, 2)
    self._rep = sharding.replicated(mesh)
    self._cache_sh = kv_cache.shardings(cfg.model, mesh, rules)
    self._prefills: dict[int, Any] = {}
    self._step = None
    self.timing = Timing()
    self.compilations = 0  # prefill widths + 1 decode step: each shape compiles once

  # -- compiled functions -----------------------------------------------------------------

  def _net(self, params, buffers):
    return nnx.merge(self.graphdef, params, buffers)

  def _choose(self, logits_BxV, sequence_B, step):
    keys_B = sampling_lib.keys(self.seed, sequence_B, step)
    return sampling_lib.sample(logits_BxV, keys_B, self.sampling)

  def _loads(self, moe):
    """[N, E] assignments per expert in each MoE layer (when tracked; else a 0 scalar)."""
    if not self.track_experts or moe is None:
      return jnp.zeros((), jnp.int32)
    return moe.stats["expert_load"]

  def _prefill_fn(self, params, buffers, tokens_BxT, start_B, sequence_B):
    cache = kv_cache.init(self.cfg.model, start_B, self.cache_len)
    logits, cache, moe = self._net(params, buffers).cached(tokens_BxT, cache, last_only=True)
    logits_BxV = logits[:, 0]
    return self._choose(logits_BxV, sequence_B, 0), logits_BxV, cache, self._loads(moe)

  def _step_fn(self, params, buffers, cache, tokens_B, sequence_B, step):
    logits, cache, moe = self._net(params, buffers).cached(tokens_B[:, None], cache)
    logits_BxV = logits[:, 0]
    return self._choose(logits_BxV, sequence_B, step), logits_BxV, cache, self._loads(moe)

  def _compile(self, fn, args, donate=()):
    t0 = time.perf_counter()
    out_sh = (self._batch1, self._batch2, self._cache_sh, self._rep)
    with jax.set_mesh(self.mesh), sharding.use_rules(self.cfg.mesh.rules):
      compiled = jax.jit(fn, donate_argnums=donate, out_shardings=out_sh).lower(
          *args).compile(self.compiler_options)
    self.timing.compile_s += time.perf_counter() - t0
    self.compilations += 1
    return compiled

  def prefill(self, tokens_BxT: np.ndarray, start_B: np.ndarray, sequence_B: np.ndarray):
    """(next token [B], its logits [B, V], cache, expert loads): device arrays."""
    args = (self.params, self.buffers, jax.device_put(tokens_BxT.astype(np.int32),
                                                      self._batch2),
            jax.device_put(start_B.astype(np.int32), self._batch1),
            jax.device_put(sequence_B.astype(np.int32), self._batch1))
    width = tokens_BxT.shape[1]
    if width not in self._prefills:
      self._prefills[width] = self._compile(self._prefill_fn, args)
    t0 = time.perf_counter()
    out = jax.block_until_ready(self._prefills[width](*args))
    self.timing.prefill_s += time.perf_counter() - t0
    return out

  def step(self, cache: kv_cache.KVCache, tokens_B, sequence_B, step: int):
    """One decode step (the cache is donated): same outputs as prefill."""
    args = (self.params, self.buffers, cache, tokens_B, sequence_B,
            jax.device_put(np.int32(step), self._rep))
    if self._step is None:
      self._step = self._compile(self._step_fn, args, donate=(2,))
    t0 = time.perf_counter()
    out = jax.block_until_ready(self._step(*args))
    dt = time.perf_counter() - t0
    self.timing.decode_s += dt
    self.timing.step_s.append(dt)
    return out

  # -- the loop -------------------------------------------------------------------------

  def prompt_width(self, longest: int, max_new_tokens: int) -> int:
    """Prompt columns of a batch: the longest prompt rounded up to PROMPT_BUCKET when the
    cache has room for that and the new tokens."""
    return max(longest, min(_round_up(longest, PROMPT_BUCKET), self.cache_len - max_new_tokens))

  def generate(self, prompts: Sequence[np.ndarray], max_new_tokens: int, *, eos_id: int = -1,
               on_token: Callable[[int, int], None] | None = None,
               keep_logits: bool = False, first_index: int = 0) -> list[Completion]:
    """Every prompt's continuation, batch after batch.

    Prompt i is sequence first_index + i: its sampling stream (sampling.keys) and the
    index `on_token(index, token)` is called with for each new token as soon as it is
    chosen (EOS included), for streaming. `keep_logits` keeps each generated position's
    logits.
    """
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    check_prompts(prompts, max_new_tokens, self.cache_len)
    out = []
    for first in range(0, len(prompts), self.batch_size):
      rows = range(first, min(first + self.batch_size, len(prompts)))
      out += self._batch([prompts[i] for i in rows], [first_index + i for i in rows],
                         max_new_tokens, eos_id, on_token, keep_logits)
    return out

  def _batch(self, prompts, ids, max_new_tokens, eos_id, on_token, keep_logits):
    b = self.batch_size
    width = self.prompt_width(max(len(p) for p in prompts), max_new_tokens)
    tokens_BxT = np.zeros((b, width), np.int32)
    start_B = np.full((b,), width - 1, np.int32)  # filler rows: a 1-token prompt
    for row, p in enumerate(prompts):
      tokens_BxT[row, width - len(p):] = p
      start_B[row] = width - len(p)
    sequence_B = np.full((b,), -1, np.int32)
    sequence_B[:len(ids)] = ids
    results = [Completion(p, [], logits=[] if keep_logits else None) for p in prompts]
    live = np.zeros((b,), bool)
    live[:len(prompts)] = True

    next_B, logits_BxV, cache, _ = self.prefill(tokens_BxT, start_B, sequence_B)
    self.timing.prefill_tokens += sum(len(p) for p in prompts)
    seq_dev = jax.device_put(sequence_B, self._batch1)
    for t in range(max_new_tokens):
      if t > 0:
        next_B, logits_BxV, cache, loads = self.step(cache, next_B, seq_dev, t)
        self.timing.decode_tokens += int(live.sum())
        if self.track_experts:
          self.timing.step_experts.append(int(np.count_nonzero(np.asarray(loads))))
      next_np = np.asarray(next_B)
      logits_np = np.asarray(logits_BxV) if keep_logits else None
      for row in np.flatnonzero(live):
        tok, r = int(next_np[row]), results[row]
        if on_token is not None:
          on_token(ids[row], tok)
        if keep_logits:
          r.logits.append(logits_np[row])
        if tok == eos_id:
          r.stopped_by_eos, live[row] = True, False
        else:
          r.tokens.append(tok)
      if not live.any():
        break
    return results
