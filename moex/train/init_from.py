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
from moex.train import workdir as workdir_lib
from moex.train.checkpoint import CheckpointError, _quiet_abandoned_futures, _reason

PARAMS = "params"  # SOURCE/params/: the parameters-only checkpoint.
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


def load_params(source: str, abstract_params, abstract_buffers) -> tuple[dict, dict]:
  """(params, buffers) from workdir `source`, shaped, typed and sharded like the abstract
  trees (jax.ShapeDtypeStruct leaves with shardings: state.build's abstract_state parts).

  ConfigError (one line) when `source` holds neither params/ nor a checkpoint, or when a
  parameter is missing, extra or of another shape; CheckpointError when it cannot be read.
  """
  where, label = locate(source)
  wanted = {"params": abstract_params, "buffers": abstract_buffers}
  saved = _saved_shapes(where)
  target = params_lib.with_old_names(wanted) if params_lib.has_old_names(saved) else wanted
  _check_shapes(saved, _flat_shapes(target), where)
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype, global_shape=a.shape),
      target)
  try:
    with _quiet_abandoned_futures():
      restored = ocp.PyTreeCheckpointer().restore(where, args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise CheckpointError(f"train.init_from: cannot read {where} ({_reason(e)})") from None
  if target is not wanted:  # back under this moex's names
    restored = jax.tree.unflatten(jax.tree.structure(wanted), jax.tree.leaves(restored))
  params, buffers = restored["params"], restored.get("buffers") or {}
  logging.info("init_from: %d parameters from %s (%s)", _size(params), source, label)
  return params, buffers


def locate(source: str) -> tuple[epath.Path, str]:
  """The orbax tree to read (params/, else the newest checkpoint's state) and its label."""
  root = workdir_lib.path(source)
  params = root / PARAMS
  if params.exists():
    if not ocp.step.is_path_finalized(params):
      raise ConfigError(f"train.init_from: {params} is not a finished write (orbax's "
                        "commit marker is missing); write it again with save_params")
    return params, f"{PARAMS}/"
  checkpoints = root / "checkpoints"
  steps = ocp.utils.checkpoint_steps(checkpoints) if checkpoints.exists() else []
  steps = [s for s in steps if (checkpoints / str(s) / "state").exists()]
  if not steps:
    raise ConfigError(f"train.init_from: {source} has neither {PARAMS}/ nor a checkpoint")
  return checkpoints / str(max(steps)) / "state", f"checkpoint step {max(steps)}"


def _saved_shapes(where: epath.Path) -> dict:
  """{(section, *key): shape} of the saved params and buffers, from the orbax metadata."""
  try:
    with _quiet_abandoned_futures():
      tree = ocp.PyTreeCheckpointer().metadata(where).item_metadata.tree
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise CheckpointError(f"train.init_from: cannot read the metadata of {where} "
                          f"({_reason(e)})") from None
  return _flat_shapes({k: tree.get(k) or {} for k in _KINDS})


def _flat_shapes(tree: dict) -> dict:
  flat = ocp.tree.to_flat_dict(tree)
  return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, "shape")}


def _check_shapes(saved: dict, wanted: dict, where: epath.Path) -> None:
  """ConfigError naming the first parameter (or buffer) missing, extra or differently shaped."""
  for key, shape in wanted.items():
    kind, name = _KINDS[key[0]], "/".join(key[1:])
    if key not in saved:
      raise ConfigError(f"train.init_from: {kind} {name} is not in {where}; the config makes "
                        f"it {shape}")
    if saved[key] != shape:
      raise ConfigError(f"train.init_from: {kind} {name} has shape {saved[key]} in {where}, "
                        f"the config makes {shape}")
  for key in saved:
    if key not in wanted:
      kind, name = _KINDS[key[0]], "/".join(key[1:])
      raise ConfigError(f"train.init_from: {kind} {name} {saved[key]} in {where} is not in "
                        "the config's model")


def _size(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
