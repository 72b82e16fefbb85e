"""Generation with the KV cache: python -m moex.generate --workdir=DIR (trained or imported).

  python -m moex.generate --workdir=workdirs/tiny --prompt="def parse(" --max_new_tokens=64
  python -m moex.generate --workdir=DIR --prompts_file=prompts.txt --batch_size=8 \\
      --temperature=0.8 --top_p=0.95 --seed=1
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m moex.generate \\
      --workdir=DIR --prompts_file=prompts.txt --batch_size=8 --mesh=expert=8

Prompts (one per line of --prompts_file, UTF-8, and/or each --prompt) are encoded with the
workdir's tokenizer (BOS first when it has one, as in training), grouped into batches of
--batch_size and run through one prefill and one decode step per new token
(moex/generation/engine.py). Each sequence stops at its EOS or at --max_new_tokens. The
text streams when a batch holds one prompt and is printed per prompt otherwise; the last
line gives prefill and decode tokens/s.

The MoE layers run in evaluation mode: dropless (unless moe.eval_capacity_factor > 0), and
a decode step with T*K < E gathers only the chosen experts' weights (dispatch "gather").
Expert-choice routing is refused: it is non-causal. On a mesh (--mesh, default the
workdir's) the batch is split over the batch axes and the experts over `expert`.

Every refusal (a bad flag, prompt, prompts file, config or workdir) is one line
`moex.generate: ...` on stderr, exit status 2. The command only reads the workdir.
"""

from __future__ import annotations

from absl import app, flags

from moex import cli
from moex.generation import sampling, text
from moex.generation.engine import GenerateError


def define_flags() -> None:
  """Flags only when run as a program (moex.main and moex.convert define --workdir too)."""
  flags.DEFINE_string("workdir", None, "A trained or imported moex workdir.")
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeat for several).")
  flags.DEFINE_string("prompts_file", None, "A UTF-8 file with one prompt per line (blank "
                      "lines skipped).")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt at most.")
  for m in sampling.METHODS:  # one flag per sampling method (moex/generation/sampling.py)
    define = flags.DEFINE_integer if isinstance(m.default, int) else flags.DEFINE_float
    define(m.name, m.default, m.help)
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
    raise GenerateError("give --workdir=DIR (a trained or imported workdir)")
  s = sampling.Sampling(**{m.name: f[m.name].value for m in sampling.METHODS})
  text.generate_text(f.workdir, text.read_prompts(f.prompt, f.prompts_file),
                     max_new_tokens=f.max_new_tokens, sampling=s, seed=f.seed,
                     batch_size=f.batch_size, cache_len=f.cache_len, mesh_text=f.mesh,
                     stream=f.stream)


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.generate")
