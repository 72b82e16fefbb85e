"""Text in, text out: prompts from flags and files, encoding, streaming, and the generate
command's work (`generate_text`) on a workdir's model."""

from __future__ import annotations

import codecs
import sys
from typing import Sequence

import numpy as np
from etils import epath

from moex.generation import engine, loading, sampling as sampling_lib
from moex.generation.engine import GenerateError


def read_prompts(texts: Sequence[str], prompts_file: str | None) -> list[str]:
  """The --prompt texts, then the non-blank lines of --prompts_file (UTF-8); GenerateError
  (one line naming the file, and for undecodable bytes their offset) otherwise."""
  prompts = list(texts)
  if prompts_file:
    prompts += _file_lines(prompts_file)
  for i, p in enumerate(prompts):
    if not p:
      raise GenerateError(f"prompt {i} is empty: give it some text")
  if not prompts:
    raise GenerateError("no prompt: give --prompt=TEXT or --prompts_file=FILE")
  return prompts


def _file_lines(prompts_file: str) -> list[str]:
  path = epath.Path(prompts_file)
  if not path.exists():
    raise GenerateError(f"--prompts_file={prompts_file}: no such file")
  if path.is_dir():
    raise GenerateError(f"--prompts_file={prompts_file}: is a directory, not a file")
  try:
    data = path.read_bytes()
  except OSError as e:
    raise GenerateError(f"--prompts_file={prompts_file}: cannot read "
                        f"({type(e).__name__}: {e.strerror or e})") from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise GenerateError(f"--prompts_file={prompts_file}: not UTF-8 text at byte offset "
                        f"{e.start} (line {line}: byte 0x{data[e.start]:02x}, {e.reason}); "
                        "save the file as UTF-8") from None
  lines = [l for l in text.splitlines() if l.strip()]
  if not lines:
    raise GenerateError(f"--prompts_file={prompts_file}: holds no prompt")
  return lines


def encode(tok, text: str) -> np.ndarray:
  """Token ids of a prompt, BOS first when the tokenizer has one (as in training)."""
  ids = np.asarray(tok.encode(text), np.int32)
  return np.concatenate([[tok.bos_id], ids]).astype(np.int32) if tok.bos_id >= 0 else ids


def decode(tok, tokens: Sequence[int]) -> str:
  """Generated ids as text (bytes that are not UTF-8 shown as U+FFFD)."""
  return tok.decode(np.asarray(tokens, np.int32)).decode("utf-8", errors="replace")


class Streamer:
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


def generate_text(workdir: str, texts: Sequence[str], *, max_new_tokens: int,
                  sampling: sampling_lib.Sampling, seed: int, batch_size: int,
                  cache_len: int = 0, mesh_text: str = "", stream: bool = True,
                  out=sys.stdout) -> tuple[list[str], engine.Timing]:
  """The generate command's work: every prompt's continuation as text (printed to `out`
  as `--- prompt i` blocks, then one timing line), and the timing."""
  sampling.check()
  cfg, tok, mesh, graphdef, params, buffers = loading.load(workdir, mesh_text)
  prompts = [encode(tok, t) for t in texts]
  cache_len = cache_len or engine.auto_cache_len(prompts, max_new_tokens)
  gen = engine.Generator(cfg, graphdef, params, buffers, mesh, batch_size=batch_size,
                         cache_len=cache_len, sampling=sampling, seed=seed)
  engine.check_prompts(prompts, max_new_tokens, cache_len)
  streaming = stream and batch_size == 1
  texts_out = []
  for i, text in enumerate(texts):
    if streaming:
      out.write(f"--- prompt {i}\n{text}")
      out.flush()
      seqs = gen.generate([prompts[i]], max_new_tokens, eos_id=tok.eos_id,
                          on_token=Streamer(tok, tok.eos_id, out), first_index=i)
      texts_out.append(decode(tok, seqs[0].tokens))
      out.write("\n")
  if not streaming:
    seqs = gen.generate(prompts, max_new_tokens, eos_id=tok.eos_id)
    for i, (text, s) in enumerate(zip(texts, seqs)):
      texts_out.append(decode(tok, s.tokens))
      out.write(f"--- prompt {i}\n{text}{texts_out[-1]}\n")
  t = gen.timing
  out.write(f"moex.generate: {len(texts)} prompt(s), batch {batch_size}, cache {cache_len}: "
            f"prefill {t.prefill_tps:,.0f} tokens/s ({t.prefill_tokens} tokens, "
            f"{t.prefill_s:.2f} s), decode {t.decode_tps:,.1f} tokens/s "
            f"({t.decode_tokens} tokens, {t.decode_s:.2f} s); compiling {t.compile_s:.1f} s\n")
  out.flush()
  return texts_out, t
