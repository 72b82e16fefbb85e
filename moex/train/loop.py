"""The training driver: config -> data, model, state -> jitted steps -> outputs in the workdir.

Resumes from the latest checkpoint in DIR/checkpoints when there is one; else starts at step
0 from random parameters or, with train.init_from, from another workdir's (fine-tuning).
Stops cleanly on SIGTERM/SIGINT (saving a checkpoint first) and with FloatingPointError on a
non-finite loss, gradient or state (only finite states are saved, so every checkpoint on
disk is good).
"""

from __future__ import annotations

import contextlib
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from moex import config as config_lib
from moex.data import pipeline, tokenizer as tokenizer_lib
from moex.moe import dispatch as moe_dispatch, stats as moe_stats
from moex.parallel import mesh as mesh_lib, sharding
from moex.model import lora
from moex.train import checkpoint, flops, init_from, optimizer, profiler, state as state_lib
from moex.train import step as step_lib
from moex import workdir as workdir_lib
from moex.train import writers


def config_and_mesh(cd: ml_collections.ConfigDict) -> tuple[config_lib.Config, Mesh]:
  """Validates the config (vocab size from the tokenizer); builds and checks the mesh."""
  cfg = workdir_lib.validate(cd)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  mesh_lib.check_layout(cfg, mesh)
  return cfg, mesh


class _StopFlag:
  """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the next step boundary."""

  def __init__(self):
    self.signal = None

  def __call__(self, signum, frame):
    del frame
    self.signal = signum
    logging.warning("received signal %d: checkpointing and stopping after this step", signum)


@contextlib.contextmanager
def _handle_signals(flag: _StopFlag):
  # With several processes JAX's preemption service owns SIGTERM and makes every process
  # agree on the step to stop at (see _Runner.run); SIGINT stays ours.
  sigs = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
  old = {s: signal.signal(s, flag) for s in sigs}
  try:
    yield
  finally:
    for s, h in old.items():
      signal.signal(s, h)


def _to_host(tree):
  """Host copies of (replicated) arrays; works when the mesh spans several processes."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def _all_finite(state: dict) -> jax.Array:
  """Whether every floating-point leaf of the train state is finite (one device bool)."""
  finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(finite)) if finite else jnp.array(True)


def batch_keys(batch: dict) -> tuple[str, ...]:
  """The contract keys a host batch carries, in step_lib.BATCH_KEYS order (segment_ids
  and positions come together)."""
  keys = tuple(k for k in step_lib.BATCH_KEYS if k in batch)
  if "tokens" not in keys or ("segment_ids" in keys) != ("positions" in keys):
    raise config_lib.ConfigError(f"data: a batch must hold 'tokens', and 'segment_ids' "
                                 f"with 'positions' or neither; got {sorted(batch)}")
  return keys


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_and_evaluate(cd: ml_collections.ConfigDict, workdir: str,
                       max_steps: int | None = None) -> dict:
  """Runs (or resumes) the experiment; returns the last eval summary and run facts.

  `max_steps` bounds the steps taken by this call (a time-sliced job): it checkpoints and
  returns early, and the next call with the same workdir continues.
  """
  cfg, mesh = config_and_mesh(cd)
  logging.info("mesh: %s over %d devices (%s), %d processes", dict(mesh.shape),
               mesh.devices.size, jax.default_backend(), jax.process_count())
  held = workdir_lib.lock(workdir)  # Before anything reads or writes the workdir.
  try:
    return _train_locked(cd, cfg, mesh, workdir, max_steps)
  finally:
    if held is not None:
      held.release()


def _train_locked(cd: ml_collections.ConfigDict, cfg: config_lib.Config, mesh: Mesh,
                  workdir: str, max_steps: int | None) -> dict:
  """train_and_evaluate once the workdir is this run's."""
  try:
    data = pipeline.build(cfg.data, cfg.seed, jax.process_index(), jax.process_count())
  except ValueError as e:  # e.g. a split too small for one batch: the message names the key
    raise config_lib.ConfigError(str(e)) from None
  # Read before it is overwritten: the train.steps the checkpoints' schedule was made for.
  previous_steps = _previous_steps(workdir) if jax.process_index() == 0 else None
  if jax.process_index() == 0:
    wd = workdir_lib.Workdir(workdir)
    # The tokenizer's files (none for "byte"), so the workdir alone can be read back.
    tokenizer_lib.save(data.tokenizer, wd.path / workdir_lib.TOKENIZER)
    resolved = cd.to_dict()
    resolved["model"]["vocab_size"] = cfg.model.vocab_size
    wd.write_config(resolved)

  tx, lr_schedule = optimizer.make(cfg.opt, cfg.train.steps)
  # Shardings are explicit NamedShardings from the config's rules: no mesh context needed.
  model, init_fn = state_lib.build(cfg, tx, mesh)
  ckpt = checkpoint.Checkpointer(workdir, cfg.train)
  try:
    latest, state = ckpt.restore_latest(model.abstract_state, data.train_iter)
    if latest is None:  # A resume always wins over train.init_from.
      state = _initial_state(cfg, model, tx, init_fn)
  except BaseException:
    ckpt.close()  # Leaves no orbax threads behind to fail at exit.
    raise
  if latest is not None and previous_steps is not None:
    _warn_if_schedule_changed(cfg.opt, previous_steps, cfg.train.steps, latest)
  logging.info("model: %.2fM parameters (%.4gM trainable), MoE layers %s",
               state_lib.param_count(state) / 1e6,
               state_lib.trainable_count(cfg, state["params"]) / 1e6, list(cfg.model.moe_layers))
  # Steps are traced under the mesh and the rules: the MoE layer's shard_map reads both.
  with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules):
    runner = _Runner(cfg, mesh, model, data, tx, lr_schedule, workdir, ckpt, latest)
    try:
      return runner.run(state, max_steps)
    finally:
      runner.writer.close()
      ckpt.close()


def _initial_state(cfg: config_lib.Config, model: state_lib.Model, tx, init_fn) -> dict:
  """The step-0 state: random parameters, or train.init_from's with a fresh optimizer. With
  adapters (lora.rank > 0) the source holds the base model: its weights are read and the
  adapters start as init_fn makes them (B = 0: step 0 is the source model exactly)."""
  if not cfg.train.init_from:
    return init_fn(cfg.seed)
  abstract = model.abstract_state["params"]
  adapters = {}
  if cfg.lora.enabled:
    adapters = lora.adapters_of(init_fn(cfg.seed)["params"])
    abstract = lora.base_of(abstract)
  params, buffers = init_from.load_params(cfg.train.init_from, abstract,
                                          model.abstract_state["buffers"])
  return state_lib.start_from(cfg, model, tx, lora.join(params, adapters), buffers, cfg.seed)


def _previous_steps(workdir: str) -> int | None:
  """train.steps in the workdir's config.json from an earlier run, if there is one."""
  try:
    return int(workdir_lib.Workdir(workdir).raw_config()["train"]["steps"])
  except (OSError, ValueError, KeyError, TypeError):  # WorkdirError is an OSError
    return None


def _warn_if_schedule_changed(opt: config_lib.OptConfig, before: int, now: int,
                              latest: int) -> None:
  """One warning line when a changed train.steps moves the learning rates still to come."""
  if before == now or latest >= now:
    return
  old_lr = float(optimizer.schedule(opt, before)(latest))
  new_lr = float(optimizer.schedule(opt, now)(latest))
  if opt.schedule == "cosine":
    hint = "opt.schedule=wsd extends a run without changing it"
  elif latest < optimizer.decay_start(opt, before):
    return  # wsd before its decay: every learning rate up to the new decay is the same
  else:
    hint = (f"resume from a checkpoint before step {optimizer.decay_start(opt, before)} "
            "(the old decay's start) to extend without changing it")
  logging.warning("train.steps changed from %d to %d on resume at step %d: the %s learning "
                  "rate at step %d is %.3g, not %.3g, and its decay now ends at step %d; %s",
                  before, now, latest, opt.schedule, latest + 1, new_lr, old_lr, now, hint)


class _Runner:
  """Holds the compiled steps and writers of one run."""

  def __init__(self, cfg, mesh, model, data, tx, lr_schedule, workdir, ckpt, latest):
    self.cfg, self.mesh, self.model, self.data = cfg, mesh, model, data
    self.lr_schedule, self.ckpt = lr_schedule, ckpt
    self.writer = writers.Writer(workdir, resume_step=latest)
    self.workdir = workdir
    self.batch_sh = sharding.batch_sharding(cfg.mesh.rules, mesh)
    self.expert_ranks = sharding.split_size("expert", cfg.mesh.rules, mesh)
    self.mfu = flops.MFU(cfg, mesh.devices.size)
    rep = sharding.replicated(mesh)
    b, l1 = cfg.data.batch_size, cfg.data.seq_len + 1
    # The batch keys (tokens; segment_ids and positions for packed data) fix the compiled
    # signature: read from the first eval batch, checked on every train batch.
    self.batch_keys = batch_keys(data.eval_batches[0])
    abs_tokens = {k: jax.ShapeDtypeStruct((b, l1), jnp.int32, sharding=self.batch_sh)
                  for k in self.batch_keys}

    train_core, train_step = step_lib.make_train_step(cfg, model.graphdef, tx)
    acc_shapes = jax.eval_shape(train_core, model.abstract_state, abs_tokens)[1]
    self.train_acc_zeros = jax.jit(lambda: step_lib.zeros_like_tree(acc_shapes),
                                   out_shardings=rep)
    # Replicated, so every process reads the same verdict before a save.
    self.all_finite = jax.jit(_all_finite, in_shardings=(model.state_shardings,),
                              out_shardings=rep)
    t0 = time.time()
    self.train_step = jax.jit(
        train_step, in_shardings=(model.state_shardings, rep, self.batch_sh),
        out_shardings=(model.state_shardings, rep), donate_argnums=(0, 1),
    ).lower(model.abstract_state, acc_shapes, abs_tokens).compile()
    logging.info("compiled the train step in %.1fs", time.time() - t0)

    eval_core, eval_step = step_lib.make_eval_step(cfg, model.graphdef,
                                                   data.tokenizer.token_bytes)
    p_sh, bf_sh = model.state_shardings["params"], model.state_shardings["buffers"]
    abs_p, abs_bf = model.abstract_state["params"], model.abstract_state["buffers"]
    eval_shapes = jax.eval_shape(eval_core, abs_p, abs_bf, abs_tokens)
    self.eval_acc_zeros = jax.jit(lambda: step_lib.zeros_like_tree(eval_shapes),
                                  out_shardings=rep)
    self.eval_step = jax.jit(eval_step, in_shardings=(p_sh, bf_sh, rep, self.batch_sh),
                             out_shardings=rep, donate_argnums=(2,))
    # routing_churn: first choices on the first eval batch at every train log step.
    self.probe_step = jax.jit(step_lib.make_probe_step(model.graphdef, cfg.data),
                              in_shardings=(p_sh, bf_sh, self.batch_sh), out_shardings=rep)
    self.probe_batch = self._batch(data.eval_batches[0])
    self.targets_seen = 0  # loss targets of the logged train windows (tokens_per_sec)

  def probe(self, state: dict) -> np.ndarray | None:
    """First-choice experts [num_moe_layers, B, L] on the probe batch (None if dense)."""
    if not self.cfg.model.moe_layers:
      return None
    return _to_host(self.probe_step(state["params"], state["buffers"], self.probe_batch))

  def _batch(self, batch: dict) -> dict:
    """The global batch dict (this process's rows of each key) in the batch sharding."""
    got = batch_keys(batch)
    if got != self.batch_keys:
      raise config_lib.ConfigError(f"data: a batch has keys {list(got)}, the first had "
                                   f"{list(self.batch_keys)}: every batch must carry the "
                                   "same keys")
    return {k: jax.make_array_from_process_local_data(self.batch_sh, batch[k])
            for k in self.batch_keys}

  def _moe_records(self, moe_host: dict, step: int, split: str,
                   churn_N: np.ndarray | None = None) -> list[dict]:
    if not moe_host:
      return []
    # The plan the layers ran with: the same function, config, split and length.
    plan = moe_dispatch.plan(self.cfg.moe, split == "train", self.cfg.data.seq_len)
    return moe_stats.records(
        moe_host, step=step, split=split, layers=self.cfg.model.moe_layers, plan=plan,
        expert_ranks=self.expert_ranks, max_experts=self.cfg.moe.stats_max_experts,
        churn_N=churn_N)

  def evaluate(self, state: dict, step: int, write: bool = True) -> dict:
    """Runs the eval split; `write` False reports without adding lines to the workdir."""
    t0 = time.time()
    acc = self.eval_acc_zeros()
    for batch in self.data.eval_batches:
      acc = self.eval_step(state["params"], state["buffers"], acc, self._batch(batch))
    host = _to_host(acc)
    summary = step_lib.eval_summary(host)
    seconds = time.time() - t0
    aux = {"load_balance_loss": None, "seq_load_balance_loss": None, "z_loss": None}
    if host["moe"]:
      n = max(int(np.max(host["moe"]["steps"])), 1)
      reduce = np.sum if self.cfg.moe.aux_reduce == "sum" else np.mean
      aux = {k: float(reduce(host["moe"][k])) / n for k in aux}
    record = {"step": step, "split": "eval", **summary,
              "learning_rate": float(self.lr_schedule(max(step - 1, 0))), "grad_norm": None,
              "tokens_per_sec": float(host["scalars"]["tokens"]) / max(seconds, 1e-9), **aux}
    if write:
      self.writer.metrics(record)
      self.writer.moe_stats(self._moe_records(host["moe"], step, "eval"))
    logging.info("eval  step %d | loss %.4f nats/token | %.4f bits/byte | %.1fs", step,
                 summary["loss"], summary["bits_per_byte"], seconds)
    return record

  def run(self, state: dict, max_steps: int | None = None) -> dict:
    cfg = self.cfg.train
    step = int(_to_host(state["step"]))
    total = cfg.steps
    stop_at = total if max_steps is None else min(total, step + max_steps)
    tokens_per_step = self.cfg.data.batch_size * self.cfg.data.seq_len
    first_eval = last_eval = None
    if step == 0:
      first_eval = last_eval = self.evaluate(state, 0)
    if step >= total:
      # Its eval line is already in metrics.jsonl: report it again without a second copy.
      logging.info("already trained %d >= train.steps=%d steps; evaluating only", step, total)
      last_eval = self.evaluate(state, step, write=False)
    acc = self.train_acc_zeros()
    first_choice = self.probe(state)
    flag = _StopFlag()
    t_start = t_window = t_progress = time.time()
    start_step, window_start = step, step
    self.finite_at = step  # The last step whose whole state was checked finite.
    prof = profiler.StepProfiler(cfg, self.workdir)
    with _handle_signals(flag), contextlib.closing(prof):
      while step < total and flag.signal is None:
        with prof.step(step + 1, lambda: state["step"]):
          state, acc = self.train_step(state, acc, self._batch(next(self.data.train_iter)))
        step += 1
        last = step == total
        now = time.time()
        if step % cfg.log_every == 0 or last:
          host = _to_host(acc)
          acc = self.train_acc_zeros()
          s = step_lib.train_summary(host)
          if s["nonfinite"]:
            self._nonfinite(step)
          now = time.time()
          # Loss targets (B * L per step without segment ids): padding is not throughput.
          targets = int(host["scalars"]["targets"])
          self.targets_seen += targets
          tps = targets / max(now - t_window, 1e-9)
          record = {"step": step, "split": "train", "loss": s["loss"],
                    "cross_entropy": s["cross_entropy"],
                    "learning_rate": float(self.lr_schedule(step - 1)),
                    "grad_norm": s["grad_norm"], "tokens_per_sec": tps,
                    "load_balance_loss": s["load_balance_loss"],
                    "seq_load_balance_loss": s["seq_load_balance_loss"], "z_loss": s["z_loss"],
                    **self.mfu(tps), **self.data.log_fields()}
          self.writer.metrics(record)
          churn_N = None
          if first_choice is not None:
            new_choice = self.probe(state)
            churn_N = moe_stats.routing_churn(first_choice, new_choice)
            first_choice = new_choice
          self.writer.moe_stats(self._moe_records(host["moe"], step, "train", churn_N))
          t_window, window_start = now, step
          self._progress(step, total, s["loss"], tps, (now - t_start) / (step - start_step))
          t_progress = now
        elif now - t_progress >= cfg.progress_seconds:
          rate = (now - t_start) / (step - start_step)
          logging.info("step %d/%d | %.0f tok/s | %s left", step, total,
                       tokens_per_step / rate, _fmt_time(rate * (total - step)))
          t_progress = now
        if step % cfg.eval_every == 0 or last:
          last_eval = self.evaluate(state, step)
        if step == stop_at and not last:
          flag.signal = "max_steps"
        if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
          flag.signal = "preemption (SIGTERM)"
        if step % cfg.checkpoint_every == 0 or last or flag.signal is not None:
          # Only a finite state is saved: a bad one never becomes "last good", and retention
          # (keep_checkpoints) never deletes a good checkpoint to make room for it.
          nonfinite = int(_to_host(acc["scalars"]["nonfinite"]))
          if nonfinite or not bool(_to_host(self.all_finite(state))):
            self._nonfinite(step)
          self.finite_at = step
          self.ckpt.save(step, state, self.data.train_iter)
        self.writer.flush()
    self.ckpt.wait()
    elapsed = time.time() - t_start
    self.targets_seen += int(_to_host(acc["scalars"]["targets"]))  # an unlogged window
    if flag.signal is not None:
      logging.warning("stopped (%s) at step %d; re-run the same command to resume",
                      flag.signal, step)
    result = {"step": step, "seconds": elapsed, "stopped": flag.signal is not None,
              "tokens_per_sec": self.targets_seen / max(elapsed, 1e-9),
              "first_eval": first_eval, "last_eval": last_eval,
              # Only an evaluation of the step the run ended at (a stopped run may have none).
              "final_eval": last_eval if last_eval and last_eval["step"] == step else None}
    if last_eval is not None and step >= total:
      logging.info("final validation: %.4f bits per byte (loss %.4f nats/token) at step %d",
                   last_eval["bits_per_byte"], last_eval["loss"], step)
    return result

  def _progress(self, step, total, loss, tps, sec_per_step):
    mfu = self.mfu(tps)["mfu"]
    logging.info("step %d/%d | loss %.4f | lr %.2e | %.0f tok/s | MFU %s | %s left", step,
                 total, loss, float(self.lr_schedule(step - 1)), tps,
                 "n/a" if mfu is None else f"{mfu:.1%}",
                 _fmt_time(sec_per_step * (total - step)))

  def _nonfinite(self, step: int):
    self.ckpt.wait()
    good = self.ckpt.latest_step()
    when = (f"at step {step}" if step == self.finite_at + 1
            else f"between steps {self.finite_at + 1} and {step}")
    raise FloatingPointError(
        f"non-finite loss, gradients or parameters {when}; stopping. Last good checkpoint: "
        f"{'none' if good is None else f'step {good}'} in {self.ckpt.directory} (re-running "
        f"resumes from it: lower opt.learning_rate or raise opt.warmup_steps first)")
