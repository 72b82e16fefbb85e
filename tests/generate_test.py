"""moex/generate.py, the command: it works on an imported workdir (transformers' greedy text)
and every bad flag or file is one line with exit status 2."""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from generation_reference import NEW, _hf_greedy, _hub

from moex.data import tokenizer as tokenizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                        text=True, timeout=300, env=env, cwd=str(ROOT))


@pytest.mark.slow
def test_command_on_an_imported_mixtral_prints_transformers_greedy_text(tmp_path, bpe_dir):
  tok = tokenizer_lib.get_tokenizer(str(bpe_dir))
  hub = _hub("mixtral", tmp_path / "hub", vocab_size=tok.vocab_size)
  shutil.copy(bpe_dir / "tokenizer.json", hub / "tokenizer.json")
  workdir = tmp_path / "imported"
  r = _run("moex.convert", f"--from_hf={hub}", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-2000:]
  text = "def parse(x):\n    return"
  r = _run("moex.generate", f"--workdir={workdir}", f"--prompt={text}",
           f"--max_new_tokens={NEW}")
  assert r.returncode == 0, r.stderr[-2000:]
  want = tok.decode(np.asarray(_hf_greedy(hub, tok.encode(text).tolist(), tok.eos_id)))
  assert f"--- prompt 0\n{text}{want.decode('utf-8', errors='replace')}\n" in r.stdout
  last = r.stdout.strip().splitlines()[-1]
  assert "prefill" in last and "decode" in last and "tokens/s" in last, last


def test_bad_flags_and_files_are_one_line(tmp_path):
  """Each case fails before any workdir is read: `moex.generate: ...` on stderr, exit 2."""
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"ok\n\xc3(\n")
  w = f"--workdir={tmp_path / 'w'}"
  # Three processes (each pays the imports); the library tests cover every value:
  # tests/generation_sampling_test.py, tests/generation_text_test.py.
  cases = {
      "temperature_nan": ([w, "--prompt=a", "--temperature=nan"],
                          "moex.generate: --temperature: must be finite and >= 0"),
      "not_utf8": ([w, "--top_p=0.5", f"--prompts_file={bad}"],
                   f"moex.generate: --prompts_file={bad}: not UTF-8 text at byte offset 3 "
                   "(line 2: byte 0xc3"),
      "no_workdir": (["--prompt=a"],
                     "moex.generate: give --workdir=DIR (a trained or imported workdir)"),
  }
  for name, (args, start) in cases.items():
    r = _run("moex.generate", *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, (name, r.returncode, r.stderr[-2000:])
    assert lines[0].startswith(start), (name, lines[0])
