"""moex/generation/text.py: prompts from flags and files (one line for a bad file), and the
generate command's work on a trained workdir."""

import io

import pytest

from moex.generation import engine, sampling as sample, text


@pytest.mark.xdist_group("many_experts_workdir")  # the session fixture, built once
@pytest.mark.slow
def test_command_on_a_trained_workdir(many_experts_workdir):
  """The session's trained tiny run (E=256, K=8: decode steps take the gather path)."""
  out = io.StringIO()
  texts, timing = text.generate_text(
      many_experts_workdir, ["def f(x):", "x = 1"], max_new_tokens=6,
      sampling=sample.Sampling(temperature=0.8, top_k=20), seed=1, batch_size=1, stream=True,
      out=out)
  assert len(texts) == 2 and timing.prefill_tokens == 2 * 1 + len("def f(x):x = 1")  # + BOS
  assert timing.decode_tokens > 0 and timing.compile_s > 0
  printed = out.getvalue()
  assert printed.startswith("--- prompt 0\ndef f(x):" + texts[0] + "\n--- prompt 1\nx = 1")
  assert "prefill" in printed.splitlines()[-1] and "decode" in printed.splitlines()[-1]


def test_prompt_refusals_name_the_reason(tmp_path):
  with pytest.raises(engine.GenerateError, match="^--prompts_file=.*: holds no prompt"):
    (tmp_path / "p.txt").write_text("\n  \n")
    text.read_prompts([], str(tmp_path / "p.txt"))
  with pytest.raises(engine.GenerateError, match="^prompt 1 is empty"):
    text.read_prompts(["a", ""], None)
  with pytest.raises(engine.GenerateError, match="^--prompts_file=.*: is a directory"):
    text.read_prompts([], str(tmp_path))
  with pytest.raises(engine.GenerateError, match="^--prompts_file=.*: no such file"):
    text.read_prompts([], str(tmp_path / "none.txt"))


def test_a_prompts_file_that_is_not_utf8_is_one_line_with_the_byte_offset(tmp_path):
  """issue 25 #4: bytes that are not UTF-8 were a traceback ending in UnicodeDecodeError."""
  bad = tmp_path / "prompts.txt"
  bad.write_bytes("def f():\n    return 'é'\n".encode("utf-8") + b"x = \xff\xfe\n")
  with pytest.raises(engine.GenerateError) as e:
    text.read_prompts(["first"], str(bad))
  line = str(e.value)
  offset = len("def f():\n    return 'é'\n".encode("utf-8")) + len(b"x = ")
  assert line.startswith(f"--prompts_file={bad}: not UTF-8 text at byte offset {offset} "
                         "(line 3: byte 0xff"), line
  assert "\n" not in line
  (tmp_path / "ok.txt").write_bytes("é = 1\n\nλ\n".encode("utf-8"))
  assert text.read_prompts([], str(tmp_path / "ok.txt")) == ["é = 1", "λ"]
