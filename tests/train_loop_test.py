"""End-to-end: train, stop, resume; outputs follow their contracts."""

import json
import math
import os
from unittest import mock

import pytest

from moex.train import loop


def _lines(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return [json.loads(l) for l in f]


def _train_losses(workdir):
  return {r["step"]: r["loss"] for r in _lines(workdir, "metrics.jsonl") if r["split"] == "train"}


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


def test_outputs_follow_their_contracts(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  result = loop.train_and_evaluate(tiny_config, workdir)
  assert os.path.exists(os.path.join(workdir, "config.json"))
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


def test_larger_steps_continues_from_checkpoint(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config, workdir)
  tiny_config.train.steps = 8
  result = loop.train_and_evaluate(tiny_config, workdir)
  assert result["step"] == 8
  steps = [r["step"] for r in _lines(workdir, "metrics.jsonl") if r["split"] == "train"]
  assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # 1..6 from the first run, no restart


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config, workdir, max_steps=3)  # good checkpoint at 3
  tiny_config.opt.learning_rate = 1e30  # the next updates blow the weights up
  with pytest.raises(FloatingPointError, match="Last good checkpoint: step 3"):
    loop.train_and_evaluate(tiny_config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]


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


def _schedule_warnings(warning) -> list[str]:
  lines = [c.args[0] % c.args[1:] for c in warning.call_args_list]
  return [s for s in lines if s.startswith("train.steps changed")]


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
