"""train.init_from: a fresh run starts from another workdir's parameters (fine-tuning).

Read from SOURCE (a workdir, local or gs://), the first that exists:
  SOURCE/params/                 a parameters-only orbax checkpoint of
                                 {"params": pure dict, "buffers": pure dict}; save_params
                                 writes it (a checkpoint importer calls it)
  SOURCE/checkpoints/S/state     the newest moex training checkpoint; only its params and
                                 buffers are read (orbax partial restore: the optimizer
                                 state, step and RNG are never loaded)
Every saved shape is compared with the run's from the orbax metadata, before any array is
read; dtypes may differ and are cast to the run's. Arrays land on the run's own shardings,
so the source may come from any mesh or process count.
"""

from __future__ import annotations

import math

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from moex.config import ConfigError
from moex.model import params as params_lib
from moex import workdir as workdir_lib
from moex.train.checkpoint import CheckpointError, _quiet_abandoned_futures, _reason

PARAMS = workdir_lib.PARAMS  # SOURCE/params/: the parameters-only checkpoint.
_SAVE_GB = 1  # save_params: GB staged to host and being written at once.
_KINDS = {"params": "parameter", "buffers": "buffer"}


def save_params(directory: str, params: dict, buffers: dict) -> None:
  """Writes DIRECTORY/params/ ({"params", "buffers"}); replaces an older one.

  Orbax writes a temporary directory and renames it (locally) or adds its commit file last
  (gs://), so an interrupted write never reads as a finished params/; leftovers of one are
  removed first. Every process calls it with its shards of the same (sharded or host) arrays.
  """
  root = workdir_lib.path(directory)
  if jax.process_index() == 0:
    root.mkdir(parents=True, exist_ok=True)
    for tmp in root.glob(f"{PARAMS}.orbax-checkpoint-tmp*"):
      tmp.rmtree()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("moex_save_params_start")
  # An imported model is in host memory once already: bounded transfers and writes, and no
  # OCDBT (its writer held ~0.5x the model in buffers: moex.bench.convert, WORKSPACE.md).
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
      save_concurrent_gb=_SAVE_GB, save_device_host_concurrent_gb=_SAVE_GB, use_ocdbt=False))
  try:
    checkpointer.save(root / PARAMS, args=ocp.args.PyTreeSave(
        {"params": params, "buffers": buffers}), force=True)
  finally:
    checkpointer.close()
  logging.info("init_from: wrote %d parameters to %s", _size(params), root / PARAMS)


def load_params(source: str, abstract_params, abstract_buffers, who: str = "train.init_from",
                none: str | None = None) -> tuple[dict, dict]:
  """(params, buffers) from workdir `source`, shaped, typed and sharded like the abstract
  trees (jax.ShapeDtypeStruct leaves with shardings: state.build's abstract_state parts).

  Reads params/, else the newest checkpoint that reads back: newer unreadable ones are
  passed over with one warning and left where they are (a reader never moves files).
  Every message starts with `who` (the caller's name for the source: "train.init_from",
  "--workdir=DIR"). ConfigError (one line) when `source` holds neither params/ nor a
  checkpoint (`none`, if given, is that message), or when a parameter is missing, extra or
  of another shape; CheckpointError when nothing can be read.
  """
  wd = workdir_lib.Workdir(source)
  wanted = {"params": abstract_params, "buffers": abstract_buffers}
  skipped = []
  for w in wd.weight_sources(who, none):
    try:
      saved = _saved_shapes(w.path)
      old = params_lib.has_old_names(saved)
      target = params_lib.with_old_names(wanted) if old else wanted
      _check_shapes(saved, _flat_shapes(target), w.path, who)
      restored = _restore(w.path, target)
      if old:  # back under this moex's names
        restored = jax.tree.unflatten(jax.tree.structure(wanted), jax.tree.leaves(restored))
    except _Unreadable as e:
      if w.step is None:  # params/ is the only source when it exists
        raise CheckpointError(f"{who}: cannot read {e.what}{w.path} ({e.reason})") from None
      skipped.append((w, e.reason))
      continue
    workdir_lib.warn_skipped(who, wd, skipped, w)
    params, buffers = restored["params"], restored.get("buffers") or {}
    logging.info("init_from: %d parameters from %s (%s)", _size(params), source, w.label)
    return params, buffers
  raise CheckpointError(f"{who}: no checkpoint in {wd.path / workdir_lib.CHECKPOINTS} can be "
                        "read (" + "; ".join(f"step {w.step}: {why}" for w, why in skipped)
                        + ")")


class _Unreadable(Exception):
  """An orbax tree's metadata or arrays do not read (`what` says which, `reason` why)."""

  def __init__(self, what: str, reason: str):
    super().__init__(f"{what}{reason}")
    self.what, self.reason = what, reason


def _restore(where: epath.Path, wanted: dict) -> dict:
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype, global_shape=a.shape),
      wanted)
  try:
    with _quiet_abandoned_futures():
      return ocp.PyTreeCheckpointer().restore(where, args=ocp.args.PyTreeRestore(
          item=wanted, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _Unreadable("", _reason(e)) from None


def locate(source: str, who: str = "train.init_from") -> tuple[epath.Path, str]:
  """The orbax tree to read (params/, else the newest readable checkpoint's state) and its
  label (Workdir.weights)."""
  w = workdir_lib.Workdir(source).weights(who)
  return w.path, w.label


def _saved_shapes(where: epath.Path) -> dict:
  """{(section, *key): shape} of the saved params and buffers, from the orbax metadata."""
  try:
    with _quiet_abandoned_futures():
      tree = ocp.PyTreeCheckpointer().metadata(where).item_metadata.tree
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _Unreadable("the metadata of ", _reason(e)) from None
  return _flat_shapes({k: tree.get(k) or {} for k in _KINDS})


def _flat_shapes(tree: dict) -> dict:
  flat = ocp.tree.to_flat_dict(tree)
  return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, "shape")}


def _check_shapes(saved: dict, wanted: dict, where: epath.Path, who: str) -> None:
  """ConfigError naming the first parameter (or buffer) missing, extra or differently shaped."""
  for key, shape in wanted.items():
    kind, name = _KINDS[key[0]], "/".join(key[1:])
    if key not in saved:
      raise ConfigError(f"{who}: {kind} {name} is not in {where}; the config makes "
                        f"it {shape}")
    if saved[key] != shape:
      raise ConfigError(f"{who}: {kind} {name} has shape {saved[key]} in {where}, "
                        f"the config makes {shape}")
  for key in saved:
    if key not in wanted:
      kind, name = _KINDS[key[0]], "/".join(key[1:])
      raise ConfigError(f"{who}: {kind} {name} {saved[key]} in {where} is not in "
                        "the config's model")


def _size(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
