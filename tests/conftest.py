"""Shared test fixtures: a tiny config, a small text corpus written per test, tokenizers
trained on a few stdlib files (no downloads), a fake gs:// store."""

import os
import pathlib
import sys
import tempfile

import pytest

# One persistent XLA compilation cache for the whole run, both xdist workers and every
# command or tests/multidevice script they launch (the environment is inherited): most tests
# compile the same tiny model, and compiling is about half of a short training test (40 s
# cold, 20 s warm for train_loop_test::test_rerun_of_a_finished_run_adds_no_lines). Entries
# are keyed by the HLO, the flags and the jax version, so a stale one is never used; the
# folder outlives the run, which makes the next run of the edit-test loop faster too.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"moex-tests-xla-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # experiments/ is not a package on the install path.


def _write_corpus(d: pathlib.Path) -> str:
  """A handful of Python-like files in d; returns a glob for config.data.source."""
  d.mkdir()
  for i in range(12):
    lines = [f"def f_{i}_{j}(x):\n    return x * {j} + {i}  # item {i}.{j}\n" for j in range(40)]
    (d / f"mod_{i:02d}.py").write_text("".join(lines))
  return str(d / "*.py")


def _tiny(corpus: str, cache_dir: str):
  """experiments/tiny.py shrunk to run a step in well under a second on one CPU."""
  from experiments import tiny

  c = tiny.get_config()
  c.model.d_model = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.head_dim = 16
  c.model.d_ff = 64
  c.moe.num_experts = 4
  c.moe.d_expert = 32
  c.data.source = corpus
  c.data.cache_dir = cache_dir
  c.data.seq_len = 32
  c.data.batch_size = 4
  c.data.eval_batches = 2
  c.data.val_fraction = 0.2
  c.opt.warmup_steps = 2
  c.train.steps = 6
  c.train.log_every = 1
  c.train.eval_every = 3
  c.train.checkpoint_every = 3
  c.train.async_checkpointing = False
  return c


@pytest.fixture
def corpus(tmp_path) -> str:
  """A handful of Python-like files; returns a glob for config.data.source."""
  return _write_corpus(tmp_path / "corpus")


@pytest.fixture
def tiny_config(corpus, tmp_path):
  """experiments/tiny.py shrunk to run a step in well under a second on one CPU."""
  return _tiny(corpus, str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def many_experts_workdir(tmp_path_factory) -> str:
  """A real 4-step run with E=256, K=8 (above moe.stats_max_experts: per-expert lists are
  written as summaries), trained once per session for the report/compare/sweep tests."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from moex.train import loop  # pylint: disable=g-import-not-at-top

  tmp = tmp_path_factory.mktemp("many_experts")
  c = _tiny(_write_corpus(tmp / "corpus"), str(tmp / "cache"))
  c.moe.num_experts = 256
  c.moe.top_k = 8
  c.moe.d_expert = 8
  c.train.steps = 4
  c.train.log_every = 2
  c.train.eval_every = 4
  c.train.checkpoint_every = 4
  workdir = str(tmp / "workdir")
  loop.train_and_evaluate(c, workdir)
  return workdir


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
  """Full float32 matmuls (no TF32/bf16 passes on accelerators) for 1e-5 comparisons."""
  import jax  # pylint: disable=g-import-not-at-top
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("MOEX_CACHE_DIR", str(tmp_path / "token_cache"))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> pathlib.Path:
  """A GPT-2 style byte-level BPE trained on a few stdlib files: DIR/tokenizer.json."""
  from data_text import train_bpe  # pylint: disable=g-import-not-at-top
  return train_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> pathlib.Path:
  """A SentencePiece BPE trained on a few stdlib files: DIR/tokenizer.model."""
  from data_text import train_sentencepiece  # pylint: disable=g-import-not-at-top
  return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """gs:// served from memory through etils.epath's fsspec backend (the one it uses when
  TensorFlow is absent); like GCS, it cannot append. The cwd is an empty folder."""
  import fsspec.registry  # pylint: disable=g-import-not-at-top,unused-import  (in sys.modules)
  from etils.epath import backend as epath_backend  # pylint: disable=g-import-not-at-top
  from fsspec.implementations.memory import MemoryFileSystem  # pylint: disable=g-import-not-at-top

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):
      del finalize_on_close
      super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
      return MemoryFileSystem._strip_protocol(str(path).removeprefix("gs://"))

    def _open(self, path, mode="rb", **kwargs):
      if "a" in mode:
        raise NotImplementedError("GCS objects cannot be appended to")
      return super()._open(path, mode, **kwargs)

  for name in ("gs", "gcs"):
    # fsspec.registry is a read-only view of the module's _registry.
    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, name, FakeGCS)  # pylint: disable=protected-access
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield FakeGCS
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  assert not os.listdir(cwd)  # No local `gs:` folder: nothing went through os paths.


def pytest_collection_finish(session):
  """Says so when xdist_group marks are ignored: --dist loadgroup (pyproject.toml) groups by
  renaming each marked test's node id, which pytest 9.2 silently undoes
  (pytest-dev/pytest-xdist#1386); the expensive shared fixtures are then built per worker."""
  if not session.config.getoption("loadgroup", False):
    return
  lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group")
          and "@" not in i.nodeid]
  if lost:
    session.config.issue_config_time_warning(pytest.PytestWarning(
        f"xdist_group is ignored by pytest {pytest.__version__} ({lost[0]} and"
        f" {len(lost) - 1} more run ungrouped): install with -c constraints.txt"), stacklevel=1)
