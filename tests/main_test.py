"""moex/main.py: a bad flag, config file or override ends in one line, never a traceback."""

import pathlib
import subprocess
import sys

import pytest
from absl import flags

from moex import main as main_lib
from moex.train import checkpoint, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.py"


def _main(tmp_path, config, *overrides):
  cmd = [sys.executable, "-m", "moex.main", f"--config={config}",
         f"--workdir={tmp_path / 'w'}", *overrides]
  # Every case fails while parsing flags, before a device or the data is touched.
  return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def _one_line(r) -> str:
  assert r.returncode != 0, r.stderr
  assert "Traceback" not in r.stderr, r.stderr
  return r.stderr.strip().splitlines()[-1]


def _line_of(path: pathlib.Path, start: str) -> int:
  return next(i for i, s in enumerate(path.read_text().splitlines(), 1) if s.startswith(start))


def _edited(tmp_path, old: str, new: str) -> pathlib.Path:
  """experiments/tiny.py with one line replaced, written to tmp_path."""
  text = TINY.read_text()
  assert old in text
  path = tmp_path / "edited.py"
  path.write_text(text.replace(old, new))
  return path


def test_unknown_override_key_names_it_with_the_hint(tmp_path):
  last = _one_line(_main(tmp_path, "experiments/tiny.py", "--config.moe.capcity_factor=2"))
  assert last == ("moex: config error: --config.moe.capcity_factor: experiments/tiny.py has "
                  "no key moe.capcity_factor; did you mean moe.capacity_factor?")


def test_unknown_override_section_names_it(tmp_path):
  last = _one_line(_main(tmp_path, "experiments/tiny.py", "--config.optt.b1=0.5"))
  assert last == ("moex: config error: --config.optt.b1: experiments/tiny.py has no key "
                  "optt; did you mean opt?")


@pytest.mark.parametrize("name", ["missing.py", "missing.py:variant"])
def test_missing_config_file_names_it(tmp_path, name):
  path = tmp_path / name
  last = _one_line(_main(tmp_path, path, "--config.seed=1"))
  assert last == (f"moex: config error: --config={path}: no such file "
                  f"{tmp_path / 'missing.py'}")


def test_config_file_syntax_error_names_file_and_line(tmp_path):
  path = _edited(tmp_path, "  c.seed = 0", "  c.seed = = 0")
  last = _one_line(_main(tmp_path, path))
  line = _line_of(path, "  c.seed = = 0")
  assert last == f"moex: config error: {path}:{line}: SyntaxError: invalid syntax"


def test_config_file_raising_names_file_and_line(tmp_path):
  path = _edited(tmp_path, "  c.seed = 0", "  c.seed = 1 // 0")
  last = _one_line(_main(tmp_path, path))
  line = _line_of(path, "  c.seed = 1 // 0")
  assert last == f"moex: config error: {path}:{line}: ZeroDivisionError: integer division or " \
                 "modulo by zero"


def test_config_file_without_get_config(tmp_path):
  path = tmp_path / "empty.py"
  path.write_text("x = 1\n")
  last = _one_line(_main(tmp_path, path))
  assert last == f"moex: config error: {path}: defines no get_config()"


@pytest.mark.parametrize("section", ["data", "opt"])
def test_config_without_a_section_names_it(tmp_path, section):
  letter = {"data": "d", "opt": "o"}[section]
  path = _edited(tmp_path, f"  c.{section} = {letter} = ", f"  {letter} = ")
  last = _one_line(_main(tmp_path, path))
  assert last == f"moex: config error: {section}: missing section"


def test_override_of_a_missing_section_names_it(tmp_path):
  path = _edited(tmp_path, "  c.opt = o = ", "  o = ")
  last = _one_line(_main(tmp_path, path, "--config.opt.b1=0.5"))
  assert last == f"moex: config error: --config.opt.b1: {path} has no key opt"


def test_bad_flag_value_is_one_line(tmp_path):
  last = _one_line(_main(tmp_path, "experiments/tiny.py", "--config.train.steps=1.5"))
  assert last.startswith("moex: flag error: flag --config.train.steps=1.5: ")
  assert last.endswith("(see --helpshort)")


def test_checkpoint_io_error_is_one_line_and_not_a_config_error(tmp_path, monkeypatch, capsys):
  said = ("checkpoints: could not write step 6 to /w/checkpoints (No space left on device "
          "(errno 28)); free space or fix that directory, then re-run to resume from step 3")

  def disk_full(cd, workdir):
    raise checkpoint.CheckpointError(said)

  monkeypatch.setattr(loop, "train_and_evaluate", disk_full)
  if "heartbeat_timeout" not in flags.FLAGS:  # flags are defined by the command, not at import
    main_lib.define_flags()
  flags.FLAGS(["moex", f"--config={ROOT / 'experiments' / 'tiny.py'}",
               f"--workdir={tmp_path / 'run'}"])
  try:
    with pytest.raises(SystemExit) as e:
      main_lib.main([])
  finally:
    flags.FLAGS.unparse_flags()
  assert e.value.code == 2  # a refusal (moex.errors.EXIT_CODE)
  assert capsys.readouterr().err.strip().splitlines()[-1] == f"moex: {said}"
