"""Generation with the KV cache: python -m moex.generate --workdir=DIR (trained or imported).

  python -m moex.generate --workdir=workdirs/tiny --prompt="def parse(" --max_new_tokens=64
  python -m moex.generate --workdir=DIR --prompts_file=prompts.txt --batch_size=8 \\
      --temperature=0.8 --top_p=0.95 --seed=1
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m moex.generate \\
      --workdir=DIR --prompts_file=prompts.txt --batch_size=8 --mesh=expert=8

Prompts (one per line of --prompts_file, and/or each --prompt) are encoded with the
workdir's tokenizer (BOS first when it has one, as in training), grouped into batches of
--batch_size, left-padded to a common width (a multiple of 16, so few widths compile), and
run through one prefill that fills the cache, then one decode step per new token
(moex/model/cache.py; both compiled once per shape and reused). Each sequence stops at its
EOS or at --max_new_tokens. The text streams when a batch holds one prompt and is printed
per prompt otherwise; the last line gives prefill and decode tokens/s.

The MoE layers run in evaluation mode: dropless (unless moe.eval_capacity_factor > 0), and
a decode step with T*K < E gathers only the chosen experts' weights (dispatch "gather").
Expert-choice routing is refused: it is non-causal. On a mesh (--mesh, default the
workdir's) the batch is split over the batch axes and the experts over `expert`.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import Mesh

from moex import errors
from moex import config as config_lib
from moex import sample as sample_lib
from moex.data import tokenizer as tokenizer_lib
from moex.model import cache as kv_cache
from moex.moe import routing
from moex.parallel import mesh as mesh_lib, sharding
from moex.train import checkpoint, init_from, state as state_lib
from moex.train import workdir as workdir_lib

PROMPT_BUCKET = 16  # prompt widths are rounded up to a multiple of this (fewer compiles)


class GenerateError(ValueError, errors.Refusal):
  """A one-line reason generation cannot proceed (names the flag, prompt or file)."""


def refuse_noncausal(cfg: config_lib.Config) -> None:
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
               sampling: sample_lib.Sampling = sample_lib.Sampling(), seed: int = 0,
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
    keys_B = sample_lib.keys(self.seed, sequence_B, step)
    return sample_lib.sample(logits_BxV, keys_B, self.sampling)

  def _loads(self, moe):
    """[N, E] assignments per expert in each MoE layer (when tracked; else a 0 scalar)."""
    if not self.track_experts or moe is None:
      return jnp.zeros((), jnp.int32)
    return moe.stats["expert_load"]

  def _prefill_fn(self, params, buffers, tokens_BxP, start_B, sequence_B):
    cache = kv_cache.init(self.cfg.model, start_B, self.cache_len)
    logits, cache, moe = self._net(params, buffers).cached(tokens_BxP, cache, last_only=True)
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

  def prefill(self, tokens_BxP: np.ndarray, start_B: np.ndarray, sequence_B: np.ndarray):
    """(next token [B], its logits [B, V], cache, expert loads): device arrays."""
    args = (self.params, self.buffers, jax.device_put(tokens_BxP.astype(np.int32),
                                                      self._batch2),
            jax.device_put(start_B.astype(np.int32), self._batch1),
            jax.device_put(sequence_B.astype(np.int32), self._batch1))
    width = tokens_BxP.shape[1]
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

    Prompt i is sequence first_index + i: its sampling stream (moex/sample.py keys) and the
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
    tokens_BxP = np.zeros((b, width), np.int32)
    start_B = np.full((b,), width - 1, np.int32)  # filler rows: a 1-token prompt
    for row, p in enumerate(prompts):
      tokens_BxP[row, width - len(p):] = p
      start_B[row] = width - len(p)
    sequence_B = np.full((b,), -1, np.int32)
    sequence_B[:len(ids)] = ids
    results = [Completion(p, [], logits=[] if keep_logits else None) for p in prompts]
    live = np.zeros((b,), bool)
    live[:len(prompts)] = True

    next_B, logits_BxV, cache, _ = self.prefill(tokens_BxP, start_B, sequence_B)
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


# ---------------------------------------------------------------------------------------
# The command.

def read_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json (GenerateError, one line, when it is missing or not JSON)."""
  path = workdir_lib.path(workdir) / "config.json"
  if not path.exists():
    raise GenerateError(f"{path}: missing (not a moex workdir, or an import that did not "
                        "finish)")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except ValueError as e:
    raise GenerateError(f"{path}: not JSON ({e})") from None


def parse_mesh(text: str, mesh_cfg: config_lib.MeshConfig) -> config_lib.MeshConfig:
  """--mesh=a=n,b=m over the workdir's mesh config (unnamed axes 1)."""
  if not text:
    return mesh_cfg
  sizes = dict.fromkeys(config_lib.MESH_AXES, 1)
  for part in text.split(","):
    name, _, value = part.partition("=")
    if name.strip() not in sizes or not value.strip().lstrip("-").isdigit():
      raise GenerateError(f"--mesh={text}: expected axis=size pairs over "
                          f"{', '.join(config_lib.MESH_AXES)}")
    sizes[name.strip()] = int(value)
  return dataclasses.replace(mesh_cfg, **sizes)


def load(workdir: str, mesh_text: str = ""):
  """(cfg, tokenizer, mesh, graphdef, params, buffers) of a workdir's newest checkpoint or
  imported parameters, placed on the mesh."""
  cd = read_config(workdir)
  try:
    tok = tokenizer_lib.get_tokenizer(cd.data.tokenizer)
  except ValueError as e:
    raise GenerateError(str(e)) from None
  cfg = config_lib.validate(cd, vocab_size=tok.vocab_size)
  cfg = dataclasses.replace(cfg, mesh=parse_mesh(mesh_text, cfg.mesh))
  refuse_noncausal(cfg)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  ranks = sharding.split_size("expert", cfg.mesh.rules, mesh)
  if cfg.moe.num_experts % ranks:
    raise GenerateError(f"--mesh: {cfg.moe.num_experts} experts do not divide over its "
                        f"{ranks} expert-parallel ranks")
  _check_has_weights(workdir)
  graphdef, abs_params, abs_buffers = state_lib.abstract_variables(cfg, mesh)
  try:
    params, buffers = init_from.load_params(workdir, abs_params, abs_buffers)
  except (config_lib.ConfigError, checkpoint.CheckpointError) as e:
    raise GenerateError(str(e).replace("train.init_from: ", f"--workdir={workdir}: ", 1)
                        ) from None
  return cfg, tok, mesh, graphdef, params, buffers


def _check_has_weights(workdir: str) -> None:
  """GenerateError unless the workdir holds params/ (an import) or a checkpoint."""
  root = workdir_lib.path(workdir)
  if (root / init_from.PARAMS).exists():
    return
  ckpts = root / "checkpoints"
  if ckpts.exists() and any((d / "state").exists() for d in ckpts.iterdir()
                            if d.name.isdigit()):
    return
  raise GenerateError(f"--workdir={workdir}: no checkpoint (checkpoints/N/) and no imported "
                      f"{init_from.PARAMS}/ to generate from; train it (python -m moex.main) "
                      "or import a model (python -m moex.convert --from_hf)")


def read_prompts(texts: Sequence[str], prompts_file: str | None) -> list[str]:
  prompts = list(texts)
  if prompts_file:
    path = workdir_lib.path(prompts_file)
    if not path.exists():
      raise GenerateError(f"--prompts_file={prompts_file}: no such file")
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    if not lines:
      raise GenerateError(f"--prompts_file={prompts_file}: holds no prompt")
    prompts += lines
  for i, p in enumerate(prompts):
    if not p:
      raise GenerateError(f"prompt {i} is empty: give it some text")
  if not prompts:
    raise GenerateError("no prompt: give --prompt=TEXT or --prompts_file=FILE")
  return prompts


def encode(tok, text: str) -> np.ndarray:
  ids = np.asarray(tok.encode(text), np.int32)
  return np.concatenate([[tok.bos_id], ids]).astype(np.int32) if tok.bos_id >= 0 else ids


class _Streamer:
  """Prints one sequence's text as its tokens arrive (whole UTF-8 characters only)."""

  def __init__(self, tok, eos_id: int, out):
    self.tok, self.eos_id, self.out = tok, eos_id, out
    self.tokens: list[int] = []
    self.printed = 0
    self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

  def __call__(self, index: int, token: int) -> None:
    del index
    if token == self.eos_id:
      return
    self.tokens.append(token)
    data = self.tok.decode(np.asarray(self.tokens))
    self.out.write(self.utf8.decode(data[self.printed:]))
    self.out.flush()
    self.printed = len(data)


def run(workdir: str, texts: Sequence[str], *, max_new_tokens: int,
        sampling: sample_lib.Sampling, seed: int, batch_size: int, cache_len: int = 0,
        mesh_text: str = "", stream: bool = True, out=sys.stdout) -> tuple[list[str], Timing]:
  """The command's work: every prompt's continuation as text, and the timing."""
  cfg, tok, mesh, graphdef, params, buffers = load(workdir, mesh_text)
  prompts = [encode(tok, t) for t in texts]
  cache_len = cache_len or auto_cache_len(prompts, max_new_tokens)
  gen = Generator(cfg, graphdef, params, buffers, mesh, batch_size=batch_size,
                  cache_len=cache_len, sampling=sampling, seed=seed)
  check_prompts(prompts, max_new_tokens, cache_len)
  streaming = stream and batch_size == 1
  texts_out = []
  for i, text in enumerate(texts):
    if streaming:
      out.write(f"--- prompt {i}\n{text}")
      out.flush()
      seqs = gen.generate([prompts[i]], max_new_tokens, eos_id=tok.eos_id,
                          on_token=_Streamer(tok, tok.eos_id, out), first_index=i)
      completion = _text(tok, seqs[0].tokens)
      out.write("\n")
      texts_out.append(completion)
  if not streaming:
    seqs = gen.generate(prompts, max_new_tokens, eos_id=tok.eos_id)
    for i, (text, s) in enumerate(zip(texts, seqs)):
      texts_out.append(_text(tok, s.tokens))
      out.write(f"--- prompt {i}\n{text}{texts_out[-1]}\n")
  t = gen.timing
  out.write(f"moex.generate: {len(texts)} prompt(s), batch {batch_size}, cache {cache_len}: "
            f"prefill {t.prefill_tps:,.0f} tokens/s ({t.prefill_tokens} tokens, "
            f"{t.prefill_s:.2f} s), decode {t.decode_tps:,.1f} tokens/s "
            f"({t.decode_tokens} tokens, {t.decode_s:.2f} s); compiling {t.compile_s:.1f} s\n")
  out.flush()
  return texts_out, t


def _text(tok, tokens: list[int]) -> str:
  return tok.decode(np.asarray(tokens, np.int32)).decode("utf-8", errors="replace")


def _define_flags() -> None:
  """Flags only when run as a program (moex.main and moex.convert define --workdir too)."""
  flags.DEFINE_string("workdir", None, "A trained or imported moex workdir.")
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeat for several).")
  flags.DEFINE_string("prompts_file", None, "A file with one prompt per line (blank lines "
                      "skipped).")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt at most.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy; else the sampling temperature.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens of total "
                     "probability p (1 = all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same text.")
  flags.DEFINE_integer("batch_size", 1, "Prompts decoded together.")
  flags.DEFINE_integer("cache_len", 0, "KV cache columns per sequence (0 = the longest "
                       "prompt + max_new_tokens, rounded up).")
  flags.DEFINE_string("mesh", "", "Mesh axis sizes, e.g. expert=8 or data=2,expert=4 "
                      "(unnamed axes 1); default: the workdir's mesh.")
  flags.DEFINE_bool("stream", True, "Print tokens as they come (batches of one prompt).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.workdir:
    sys.exit("moex.generate: give --workdir=DIR (a trained or imported workdir)")
  try:
    texts = read_prompts(f.prompt, f.prompts_file)
    sampling = sample_lib.Sampling(f.temperature, f.top_k, f.top_p)
    try:
      sampling.check()
    except ValueError as e:
      raise GenerateError(str(e)) from None
    run(f.workdir, texts, max_new_tokens=f.max_new_tokens, sampling=sampling, seed=f.seed,
        batch_size=f.batch_size, cache_len=f.cache_len, mesh_text=f.mesh, stream=f.stream)
  except (GenerateError, config_lib.ConfigError, workdir_lib.WorkdirError,
          checkpoint.CheckpointError) as e:
    sys.exit(f"moex.generate: {e}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
