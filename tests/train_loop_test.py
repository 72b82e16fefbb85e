"""End-to-end: train, stop, resume; outputs follow their contracts."""

import gzip
import json
import math
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moex import config as config_lib
from moex.data import pipeline, tokenizer as tokenizer_lib
from moex.train import loop
from moex.train import step as step_lib


def _lines(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return [json.loads(l) for l in f]


def _train_losses(workdir):
  return {r["step"]: r["loss"] for r in _lines(workdir, "metrics.jsonl") if r["split"] == "train"}


@pytest.mark.slow
def test_stop_and_resume_matches_straight_run(tiny_config, tmp_path):
  straight = str(tmp_path / "straight")
  loop.train_and_evaluate(tiny_config, straight)

  resumed = str(tmp_path / "resumed")
  first = loop.train_and_evaluate(tiny_config, resumed, max_steps=4)  # checkpoint at 4
  assert first["stopped"] and first["step"] == 4
  second = loop.train_and_evaluate(tiny_config, resumed)
  assert second["step"] == 6 and not second["stopped"]

  a, b = _train_losses(straight), _train_losses(resumed)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  for s in a:
    assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6), s
  evals_a = [r for r in _lines(straight, "metrics.jsonl") if r["split"] == "eval"]
  evals_b = [r for r in _lines(resumed, "metrics.jsonl") if r["split"] == "eval"]
  assert [r["step"] for r in evals_a] == [r["step"] for r in evals_b] == [0, 3, 6]
  assert evals_b[-1]["bits_per_byte"] == pytest.approx(evals_a[-1]["bits_per_byte"], rel=1e-6)


@pytest.mark.slow
def test_outputs_follow_their_contracts(tiny_config, tmp_path):
  tiny_config.train.profile_start = 2
  tiny_config.train.profile_steps = 2
  workdir = str(tmp_path / "run")
  result = loop.train_and_evaluate(tiny_config, workdir)
  # train.profile_steps: a jax.profiler trace for TensorBoard of steps 2 and 3, and no others.
  runs = list((tmp_path / "run" / "tensorboard" / "plugins" / "profile").iterdir())
  assert len(runs) == 1
  names = [p.name for p in runs[0].iterdir()]
  assert any(n.endswith(".xplane.pb") for n in names), names
  trace = json.loads(gzip.decompress(next(runs[0].glob("*.trace.json.gz")).read_bytes()))
  steps = {e["args"]["step_num"] for e in trace["traceEvents"]
           if e.get("name") == "train" and "step_num" in e.get("args", {})}
  assert steps == {"2", "3"}, steps
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert not os.path.exists(os.path.join(workdir, "tokenizer"))  # "byte" has no files
  assert any(n.startswith("events") for n in os.listdir(os.path.join(workdir, "tensorboard")))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert result["final_eval"]["bits_per_byte"] < result["first_eval"]["bits_per_byte"]

  for r in _lines(workdir, "metrics.jsonl"):
    for k in ("step", "split", "loss", "learning_rate", "grad_norm", "tokens_per_sec",
              "load_balance_loss", "z_loss"):
      assert k in r, k
    assert math.isfinite(r["loss"])
    if r["split"] == "eval":
      assert r["bits_per_byte"] > 0

  stats = _lines(workdir, "moe_stats.jsonl")
  assert {(r["split"], r["layer"]) for r in stats} == {(s, l) for s in ("train", "eval")
                                                       for l in (0, 1)}
  cfg = tiny_config
  for r in stats:
    load, kept = r["expert_load"], r["expert_kept"]
    assert len(load) == r["num_experts"] == cfg.moe.num_experts
    assert sum(load) == r["tokens"] * r["top_k"]
    assert all(k <= l for k, l in zip(kept, load))
    if r["dispatch"] == "dropless":
      assert kept == load and r["capacity"] is None and r["dropped_fraction"] == 0
    else:
      sequences = r["tokens"] // cfg.data.seq_len
      assert all(k <= r["capacity"] * sequences for k in kept)
      assert r["dropped_fraction"] == pytest.approx(1 - sum(kept) / sum(load))
    assert 0 <= r["router_entropy"] <= math.log(r["num_experts"]) + 1e-6
    assert r["needed_capacity_factor"] > 0
    if r["split"] == "train":  # the probe batch re-routed at every log step
      assert 0.0 <= r["routing_churn"] <= 1.0
    else:
      assert r["routing_churn"] is None


def test_a_bad_tokenizer_path_is_a_config_error(tiny_config, tmp_path):
  missing = tmp_path / "no_such_tokenizer"
  tiny_config.data.tokenizer = str(missing)
  with pytest.raises(config_lib.ConfigError) as e:
    loop.config_and_mesh(tiny_config)
  assert str(e.value).startswith(f"data.tokenizer: {missing}: no such file or directory; ")


@pytest.mark.slow
def test_training_with_a_bpe_tokenizer_keeps_it_in_the_workdir(tiny_config, bpe_dir, tmp_path):
  """A tokenizer.json run: finite bits per byte, and WORKDIR/tokenizer/ reloads the same one."""
  src = tmp_path / "tok"
  src.mkdir()
  (src / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
  (src / "tokenizer_config.json").write_text('{"bos_token": "<|endoftext|>"}')
  tiny_config.data.tokenizer = str(src)
  tiny_config.train.steps = tiny_config.train.eval_every = tiny_config.train.checkpoint_every = 2
  workdir = tmp_path / "run"
  result = loop.train_and_evaluate(tiny_config, str(workdir))
  assert result["step"] == 2
  final = result["final_eval"]
  assert math.isfinite(final["bits_per_byte"]) and final["bits_per_byte"] > 0
  # Divided by the bytes the BPE targets stand for (about 2 per token here), not by tokens.
  data = pipeline.build(config_lib.validate(tiny_config, vocab_size=800).data, 0)
  targets = np.concatenate([b["tokens"][:, 1:] for b in data.eval_batches])
  text_bytes = int(data.tokenizer.token_bytes[targets].sum())
  assert text_bytes > 1.5 * targets.size
  assert final["bits_per_byte"] == pytest.approx(
      final["loss"] / math.log(2) * targets.size / text_bytes, rel=1e-5)
  saved = workdir / "tokenizer"
  assert sorted(os.listdir(saved)) == ["tokenizer.json", "tokenizer_config.json"]
  assert (saved / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
  again = tokenizer_lib.get_tokenizer(str(saved))
  original = tokenizer_lib.get_tokenizer(str(src))
  assert (again.name, again.bos_id, again.eos_id) == (original.name, original.bos_id,
                                                      original.eos_id)
  with open(workdir / "config.json") as f:
    assert json.load(f)["model"]["vocab_size"] == 800


@pytest.mark.slow
def test_larger_steps_continues_from_checkpoint(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config, workdir)
  tiny_config.train.steps = 8
  result = loop.train_and_evaluate(tiny_config, workdir)
  assert result["step"] == 8
  steps = [r["step"] for r in _lines(workdir, "metrics.jsonl") if r["split"] == "train"]
  assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # 1..6 from the first run, no restart


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config, workdir, max_steps=3)  # good checkpoint at 3
  tiny_config.opt.learning_rate = 1e30  # the next updates blow the weights up
  with pytest.raises(FloatingPointError, match="Last good checkpoint: step 3"):
    loop.train_and_evaluate(tiny_config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]


def _checkpoints_on_disk_are_finite(workdir) -> list[int]:
  """The steps on disk; fails unless every saved array (params, optimizer state) is finite."""
  root = os.path.join(workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(root))
  for s in steps:
    saved = ocp.StandardCheckpointer().restore(os.path.join(root, str(s), "state"))
    for x in jax.tree.leaves(saved):
      x = np.asarray(x)
      assert not np.issubdtype(x.dtype, np.inexact) or np.isfinite(x).all(), f"step {s}"
  return steps


@pytest.mark.slow
def test_nan_gradients_with_finite_loss_are_never_checkpointed(tiny_config, tmp_path):
  """lr=1e4: the loss stays finite (1e12) while the gradient norm goes NaN at step 4. That
  step was once saved as "last good", with every parameter NaN, and retention deleted a
  real good one."""
  c = tiny_config
  c.opt.learning_rate, c.train.checkpoint_every, c.train.steps = 1e4, 1, 8
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match=r"Last good checkpoint: step (\d+)") as e:
    loop.train_and_evaluate(c, workdir)
  steps = _checkpoints_on_disk_are_finite(workdir)
  assert f"step {steps[-1]} in" in str(e.value)
  grad_norms = [r["grad_norm"] for r in _lines(workdir, "metrics.jsonl") if r["split"] == "train"]
  assert all(math.isfinite(g) for g in grad_norms)  # The NaN step stops before its line.


@pytest.mark.slow
def test_nonfinite_state_is_never_checkpointed_and_rerun_resumes(tiny_config, tmp_path,
                                                                 monkeypatch):
  """Parameters poisoned from step 4 on while that step's loss and gradients are finite:
  only the check of the state itself can keep checkpoint 4 off the disk."""
  real = step_lib.make_train_step

  def poisoned(cfg, graphdef, tx):
    core, step = real(cfg, graphdef, tx)

    def nan_from_step_4(state, acc, tokens):
      state, acc = step(state, acc, tokens)
      nan = state["step"] >= 4
      return dict(state, params=jax.tree.map(lambda p: jnp.where(nan, jnp.nan, p),
                                             state["params"])), acc
    return core, nan_from_step_4

  monkeypatch.setattr(step_lib, "make_train_step", poisoned)
  c = tiny_config
  c.train.checkpoint_every, c.train.keep_checkpoints = 1, 2
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match="at step 4; .*Last good checkpoint: step 3"):
    loop.train_and_evaluate(c, workdir)
  assert _checkpoints_on_disk_are_finite(workdir) == [2, 3]  # Retention kept the good ones.

  monkeypatch.undo()
  result = loop.train_and_evaluate(c, workdir)
  assert result["step"] == 6 and result["first_eval"] is None  # Resumed, not restarted.
  steps = [r["step"] for r in _lines(workdir, "metrics.jsonl") if r["split"] == "train"]
  assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_expert_choice_lines_say_what_ran(tiny_config, tmp_path):
  """Expert choice is capacity-bound in training and evaluation alike: every line carries
  the capacity the layer ran with (it once said dropless, capacity null, on eval lines)."""
  c = tiny_config
  c.moe.router, c.moe.allow_noncausal_routing = "expert_choice", True
  c.moe.capacity_factor, c.moe.eval_capacity_factor = 1.0, 0.5
  c.train.steps, c.train.eval_every = 2, 2
  workdir = str(tmp_path / "ec")
  loop.train_and_evaluate(c, workdir)
  lines = _lines(workdir, "moe_stats.jsonl")
  cap = {"train": (1.0, 16), "eval": (0.5, 8)}  # ceil(cf * 32 * 2 / 4), min_capacity 4
  assert {r["split"] for r in lines} == {"train", "eval"}
  for r in lines:
    assert r["dispatch"] == "expert_choice", r
    assert (r["capacity_factor"], r["capacity"]) == cap[r["split"]], r
    assert r["tokens_per_group"] == 32 and r["min_capacity"] == c.moe.min_capacity
    # Each expert fills its C slots in every sequence of the window, and keeps them.
    assert r["expert_kept"] == r["expert_load"]
    assert len(set(r["expert_load"])) == 1 and r["expert_load"][0] % r["capacity"] == 0
  train = [r for r in lines if r["split"] == "train"]
  assert train[0]["expert_load"] == [4 * 16] * 4  # batch 4 (log_every 1) x C 16


@pytest.mark.slow
def test_resume_drops_a_torn_last_line(tiny_config, tmp_path, caplog):
  """A run killed mid-write leaves half a line; resuming must not append onto it."""
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config, workdir, max_steps=4)  # checkpoint at 4
  for name in ("metrics.jsonl", "moe_stats.jsonl"):
    with open(os.path.join(workdir, name), "a") as f:
      f.write('{"step": 5, "split": "train", "lo')
  loop.train_and_evaluate(tiny_config, workdir)
  assert sorted(_train_losses(workdir)) == [1, 2, 3, 4, 5, 6]  # every line parses
  assert "1 torn lines" in caplog.text
  assert [r["step"] for r in _lines(workdir, "metrics.jsonl") if r["split"] == "eval"] == [
      0, 3, 6]
  stats = _lines(workdir, "moe_stats.jsonl")
  assert sorted({r["step"] for r in stats if r["split"] == "train"}) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_rerun_of_a_finished_run_adds_no_lines(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  first = loop.train_and_evaluate(tiny_config, workdir)
  before = {n: open(os.path.join(workdir, n)).read() for n in ("metrics.jsonl",
                                                                "moe_stats.jsonl")}
  again = loop.train_and_evaluate(tiny_config, workdir)
  assert {n: open(os.path.join(workdir, n)).read() for n in before} == before
  assert again["final_eval"]["step"] == 6
  assert again["final_eval"]["bits_per_byte"] == pytest.approx(
      first["final_eval"]["bits_per_byte"], rel=1e-5)


@pytest.mark.slow
def test_stopped_run_reports_its_latest_eval_with_its_step(tiny_config, tmp_path):
  result = loop.train_and_evaluate(tiny_config, str(tmp_path / "run"), max_steps=2)
  assert result["stopped"] and result["step"] == 2
  assert result["final_eval"] is None  # no evaluation of step 2
  assert result["last_eval"]["step"] == 0


def _schedule_warnings(warning) -> list[str]:
  lines = [c.args[0] % c.args[1:] for c in warning.call_args_list]
  return [s for s in lines if s.startswith("train.steps changed")]


@pytest.mark.slow
def test_more_steps_on_resume_of_a_cosine_run_warns_in_one_line(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config, workdir)
  tiny_config.train.steps = 8
  with mock.patch.object(loop.logging, "warning") as warning:
    loop.train_and_evaluate(tiny_config, workdir)
  (line,) = _schedule_warnings(warning)
  lrs = {r["step"]: r["learning_rate"] for r in _lines(workdir, "metrics.jsonl")
         if r["split"] == "train"}
  assert line.startswith("train.steps changed from 6 to 8 on resume at step 6: the cosine "
                         f"learning rate at step 7 is {lrs[7]:.3g}, not ")
  assert line.endswith("opt.schedule=wsd extends a run without changing it")
  assert "\n" not in line


@pytest.mark.slow
def test_more_steps_on_resume_before_the_wsd_decay_change_nothing(tiny_config, tmp_path):
  tiny_config.opt.schedule, tiny_config.opt.decay_fraction = "wsd", 0.5  # decay from step 3
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config, workdir, max_steps=2)
  tiny_config.train.steps = 8
  with mock.patch.object(loop.logging, "warning") as warning:
    loop.train_and_evaluate(tiny_config, workdir, max_steps=1)
  assert not _schedule_warnings(warning)


@pytest.mark.parametrize("schedule,latest,warns", [
    ("cosine", 5, True), ("cosine", 20, True), ("wsd", 15, False), ("wsd", 16, True),
    ("wsd", 20, True)])
def test_schedule_warning_only_when_rates_to_come_move(schedule, latest, warns):
  """20 -> 40 steps: wsd (decay_fraction 0.2) keeps every step before its old decay at 16."""
  from experiments import tiny  # pylint: disable=g-import-not-at-top
  from moex import config as config_lib  # pylint: disable=g-import-not-at-top
  cd = tiny.get_config()
  cd.opt.schedule, cd.opt.warmup_steps = schedule, 2
  opt = config_lib.validate(cd, vocab_size=259).opt
  with mock.patch.object(loop.logging, "warning") as warning:
    loop._warn_if_schedule_changed(opt, 20, 40, latest)  # pylint: disable=protected-access
  assert len(_schedule_warnings(warning)) == int(warns)
  if warns and schedule == "wsd":
    assert _schedule_warnings(warning)[0].endswith(
        "resume from a checkpoint before step 16 (the old decay's start) to extend without "
        "changing it")


def test_profile_config_is_validated(tiny_config):
  tiny_config.train.profile_steps = -1
  with pytest.raises(config_lib.ConfigError, match="train.profile_steps"):
    config_lib.validate(tiny_config, vocab_size=259)


def _packed_example(tokens_BxL1: np.ndarray) -> dict:
  """Each row cut into two documents (tokens 0-9 and 10-24) and padding (25 on): the batch
  contract's segment_ids and positions, padding tokens zeroed."""
  b, l1 = tokens_BxL1.shape
  seg = np.zeros((b, l1), np.int32)
  seg[:, :10], seg[:, 10:25] = 1, 2
  pos = np.where(seg == 1, np.arange(l1), np.arange(l1) - 10) * (seg != 0)
  return {"tokens": np.where(seg != 0, tokens_BxL1, 0).astype(np.int32), "segment_ids": seg,
          "positions": pos.astype(np.int32)}


@pytest.mark.slow
def test_packed_batches_train_end_to_end_and_count_real_tokens(tiny_config, tmp_path,
                                                               monkeypatch):
  """Batches carrying segment_ids compile into the loop's steps: MoE statistics count the
  real tokens only (25 of each row's 32 inputs), and a resumed run continues."""
  monkeypatch.setattr(pipeline, "_as_example", _packed_example)
  workdir = str(tmp_path / "packed")
  first = loop.train_and_evaluate(tiny_config, workdir, max_steps=3)
  result = loop.train_and_evaluate(tiny_config, workdir)
  assert first["step"] == 3 and result["step"] == 6
  assert result["final_eval"]["bits_per_byte"] < first["first_eval"]["bits_per_byte"]
  b = tiny_config.data.batch_size
  for r in _lines(workdir, "moe_stats.jsonl"):
    per_step = b * 25
    assert r["tokens"] == (per_step * tiny_config.data.eval_batches if r["split"] == "eval"
                           else per_step), r
    assert r["dispatch"] == ("capacity" if r["split"] == "train" else "dropless")
  assert all(r["tokens_per_sec"] > 0 for r in _lines(workdir, "metrics.jsonl"))
  assert result["tokens_per_sec"] > 0
