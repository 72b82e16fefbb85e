"""Hugging Face model directory <-> moex parameters.

Import: config.json -> a moex config (families.to_moex), then every parameter is built with
`jax.make_array_from_callback` straight into its sharding: each device's callback reads only
its slice from the memory-mapped safetensors (for expert weights, only its experts), in the
checkpoint's dtype. Host memory holds the model once, plus the one tensor being converted.

Export: moex parameters -> hub-layout safetensors shards written one shard at a time into
OUT.partial/ with config.json, the tokenizer files and moex_export.json (last), then
swapped in for OUT by renames (safetensors_dir.replace_dir).
"""

from __future__ import annotations

import json
import time

import jax
import ml_dtypes  # noqa: F401  (numpy's bfloat16)
import numpy as np
from absl import logging
from etils import epath

from moex.config import Config
from moex.interop import families
from moex.interop import safetensors_dir
from moex.model import params as params_lib
from moex.interop.safetensors_dir import FormatError

CONFIG = "config.json"
# Tensors older checkpoints carry that hold no weights (recomputed RoPE tables).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
VOCAB_FILES = ("tokenizer.json", "tokenizer.model")  # Without one, there is no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


def read_config(hf_dir: str) -> dict:
  """The model directory's config.json as a dict (FormatError, one line, when unreadable)."""
  path = epath.Path(hf_dir) / CONFIG
  if not path.exists():
    raise FormatError(f"{path}: missing (not a Hugging Face model directory)")
  try:
    hf = json.loads(path.read_text())
  except ValueError as e:
    raise FormatError(f"{path}: not JSON ({e})") from None
  if not isinstance(hf, dict):
    raise FormatError(f"{path}: not a JSON object")
  return hf


def _get(tree: dict, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _index_rows(index: tuple, ndim: int) -> tuple:
  return tuple(index) + (slice(None),) * (ndim - len(index))


def load_params(hf_dir: str, cfg: Config, abstract_params: dict,
                family: families.Family) -> dict:
  """The moex parameters of the checkpoint in `hf_dir`, placed per `abstract_params`'
  shardings (jax.ShapeDtypeStruct leaves), cast to their dtypes."""
  reader = safetensors_dir.Reader(hf_dir)
  layout = family.layout(set(reader.keys()), cfg.model)
  rules = family.tensors(cfg.model, cfg.moe, layout)
  params: dict = {}
  t0 = t_log = time.time()
  for i, rule in enumerate(rules):
    target = _get(abstract_params, rule.path)
    if tuple(target.shape) != rule.shape:  # the table and the model disagree: a moex bug
      raise AssertionError(f"{'/'.join(rule.path)}: table {rule.shape} != model {target.shape}")
    cache: dict = {}

    def fetch(index, rule=rule, target=target, cache=cache):
      index = _index_rows(index, len(rule.shape))
      experts = index[0] if rule.stacked else None
      key = (experts.start, experts.stop) if experts is not None else None
      if key not in cache:  # replicated shards ask for the same rows: read them once
        cache.clear()
        cache[key] = rule.read(reader, experts).astype(target.dtype)
      arr = cache[key]
      return arr[(slice(None),) + index[1:]] if rule.stacked else arr[index]

    _set(params, rule.path, jax.make_array_from_callback(target.shape, target.sharding, fetch))
    cache.clear()
    if time.time() - t_log > 10:
      logging.info("import: %d/%d tensors, %.0fs", i + 1, len(rules), time.time() - t0)
      t_log = time.time()
  _check_all_used(reader, rules, family, cfg)
  return params


def _check_all_used(reader, rules, family, cfg) -> None:
  """Every tensor in the checkpoint has a place in the model (else one line naming it)."""
  expected = {name for rule in rules for name, _ in rule.hub}
  e = cfg.moe.num_experts
  for name in reader.keys():
    if name in expected or name.endswith(_IGNORED_SUFFIXES):
      continue
    raise FormatError(f"{reader.file_of(name)}: tensor {name} has no place in a moex "
                      f"{family.architecture} with this config.json (e.g. a bias, or "
                      f"more than {e} experts)")


def moex_sections(hf_dir: str) -> tuple[families.Family, dict, dict, dict]:
  """(family, config.json dict, moex model section, moex moe section)."""
  hf = read_config(hf_dir)
  fam, model, moe = families.to_moex(hf, str(epath.Path(hf_dir) / CONFIG))
  return fam, hf, model, moe


def tokenizer_files(directory: str) -> list[epath.Path]:
  d = epath.Path(directory)
  return [d / f for f in TOKENIZER_FILES if (d / f).exists()]


def copy_files(files, dest: epath.Path) -> None:
  dest.mkdir(parents=True, exist_ok=True)
  for f in files:
    (dest / f.name).write_bytes(f.read_bytes())


# ---------------------------------------------------------------------------------------
# Export.


def check_covers(rules, cfg: Config, fam: families.Family) -> None:
  """Unsupported, one line naming the parameter, unless the family's table writes every
  parameter of the model's tree (moex/model/params.py) exactly once: a tensor the table
  lacks would otherwise be left out of the export without a word."""
  tree = [leaf.path for leaf in params_lib.tree(cfg)]
  written = [r.path for r in rules]
  missing = [p for p in tree if p not in written]
  if missing:
    raise families.Unsupported(
        f"export to {fam.architecture}: the model has {missing[0]}"
        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        + ", which the family's tensor table does not write; add it to the family "
        "(moex/interop/families/) or export to another --architecture")
  extra = sorted(set(written) - set(tree)) or sorted({p for p in written
                                                       if written.count(p) > 1})
  if extra:
    raise families.Unsupported(f"export to {fam.architecture}: the family's tensor table "
                               f"writes {extra[0]}, which is not once in the model's tree")


def export(params_host, cfg: Config, out_dir: str, *, architecture: str | None = None,
           extra_config: dict | None = None, tokenizer_dir: str | None = None,
           max_shard_bytes: int = 4 << 30, overwrite: bool = False,
           marker: dict | None = None) -> families.Family:
  """Writes `out_dir` (config.json, safetensors, tokenizer files, safetensors_dir.MARKER)
  for transformers.

  `params_host(path) -> np.ndarray` fetches one moex parameter to host. The export is
  written in OUT.partial and swapped in by renames (safetensors_dir.replace_dir); an OUT
  that is not a previous export is refused unless `overwrite` (check_target). `marker`
  adds to what MARKER records.
  """
  fam, hf = families.from_moex(cfg.model, cfg.moe, architecture)
  if extra_config:
    hf.update({k: v for k, v in extra_config.items() if k in (
        "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")})
  hf["transformers_version"] = hf.get("transformers_version", "5.0.0")
  rules = fam.tensors(cfg.model, cfg.moe, fam.hub_layout())
  check_covers(rules, cfg, fam)
  dtype = np.dtype(cfg.model.param_dtype)
  out = epath.Path(out_dir)
  safetensors_dir.check_target(out, overwrite=overwrite)
  tmp = safetensors_dir.sibling(out, safetensors_dir.PARTIAL)
  if tmp.exists():  # an earlier export's unfinished copy
    tmp.rmtree()
  tmp.mkdir(parents=True)

  def entries():
    for rule in rules:
      group: dict = {}

      def fetch(name, rule=rule, group=group):
        if not group:  # one moex parameter fetched once for all its hub tensors
          group.update(rule.write(np.asarray(params_host(rule.path)).astype(dtype)))
        return group.pop(name)

      for name, shape in rule.hub:
        yield name, shape, dtype.name, (lambda name=name, fetch=fetch: fetch(name))

  files = safetensors_dir.write(str(tmp), entries(), max_shard_bytes)
  (tmp / CONFIG).write_text(json.dumps(hf, indent=2, sort_keys=True))
  if tokenizer_dir is not None:
    copy_files(tokenizer_files(tokenizer_dir), tmp)
  safetensors_dir.write_marker(tmp, {"format": "moex.export/1", "architecture":
                                     fam.architecture, **(marker or {})})
  safetensors_dir.replace_dir(tmp, out)
  logging.info("export: %s with %d tensors in %d file(s) -> %s", fam.architecture,
               sum(len(r.hub) for r in rules), len(files), out)
  return fam
