"""moex/interop/families: each family's tensor table against its checkpoints.

For every family and both expert layouts (the hub's per-expert files, as save_pretrained
writes them, and transformers 5's fused `experts.gate_up_proj` [E, 2F, D] /
`experts.down_proj` [E, D, F], as its state_dict holds them), every parameter of moex's
abstract tree (moex.model.params.tree, nnx.eval_shape of the modules) maps to a set of Hugging
Face tensors, and those sets partition the checkpoint: a fake checkpoint whose every element
holds its own id is read through the table, and every id comes out exactly once.
"""

import functools

import numpy as np
import pytest
import interop_tiny

from experiments import tiny
from moex import config as config_lib
from moex.interop import families, hf, safetensors_dir
from moex.model import params as params_lib

LAYOUTS = ("hub", "fused")


class _IdReader:
  """A checkpoint of `shapes` where element i of the whole checkpoint holds the value i."""

  def __init__(self, shapes: dict):
    self.shapes, self.ids, start = shapes, {}, 0
    for name in sorted(shapes):
      n = int(np.prod(shapes[name]))
      self.ids[name] = np.arange(start, start + n, dtype=np.float64).reshape(shapes[name])
      start += n
    self.total, self.read = start, set()

  def __contains__(self, name):
    return name in self.shapes

  def keys(self):
    return sorted(self.shapes)

  def get(self, name, shape=None, rows=None):
    assert name in self.shapes, f"the table reads {name}, which the checkpoint lacks"
    assert shape is None or tuple(shape) == self.shapes[name], (name, shape, self.shapes[name])
    self.read.add(name)
    return self.ids[name] if rows is None else self.ids[name][rows]


@functools.lru_cache(maxsize=None)
def _checkpoint(name: str, layout: str, tmp: str):
  """(config.json directory, {tensor name: shape}) of the family's tiny model in `layout`."""
  model = interop_tiny.hf_model(name)
  d = f"{tmp}/{name}"
  model.save_pretrained(d)
  if layout == "hub":
    reader = safetensors_dir.Reader(d)
    shapes = {k: reader.shape(k) for k in reader.keys()}
  else:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  return d, {k: s for k, s in shapes.items() if not k.endswith(hf._IGNORED_SUFFIXES)}  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  return str(tmp_path_factory.mktemp("families"))


def _cfg(directory: str):
  fam, _, model, moe = hf.moex_sections(directory)
  cd = tiny.get_config()
  cd.model.update(model)
  cd.moe.update(moe)
  return fam, config_lib.validate(cd)


def test_every_registered_family_has_a_tiny_model():
  archs = {cls_model.__name__ for _, cls_model, _ in interop_tiny.FAMILIES.values()}
  assert archs == set(families.FAMILIES)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(interop_tiny.FAMILIES))
def test_tables_partition_the_checkpoint(name, layout, tmp):
  d, shapes = _checkpoint(name, layout, tmp)
  fam, cfg = _cfg(d)
  fused_in_torch = any(k.endswith("experts.gate_up_proj") for k in shapes)
  if layout == "fused":  # transformers 5 holds experts fused exactly where the family says
    assert fused_in_torch == fam.fused, (fam.architecture, fam.fused)
  else:
    assert not fused_in_torch
  found = fam.layout(set(shapes), cfg.model)
  assert found.fused == (layout == "fused" and fam.fused)
  rules = fam.tensors(cfg.model, cfg.moe, found)

  # Every moex parameter of the abstract tree has exactly one rule, of its shape.
  tree = {leaf.path: tuple(leaf.shape) for leaf in params_lib.tree(cfg)}
  assert len(rules) == len({r.path for r in rules})
  assert {r.path: r.shape for r in rules} == tree

  reader = _IdReader(shapes)
  ids = []
  for r in rules:
    reader.read.clear()
    got = r.read(reader, None)
    assert got.shape == r.shape, r.path
    assert reader.read == {n for n, _ in r.hub}, r.path  # the declared set is the one read
    assert all(shapes[n] == s for n, s in r.hub), r.path
    if r.stacked:  # a device's experts alone read the same rows
      np.testing.assert_array_equal(r.read(reader, slice(1, 3)), got[1:3])
    ids.append(got.ravel())
  every = np.sort(np.concatenate(ids))
  # Nothing unmapped, nothing mapped twice: each element of the checkpoint lands once.
  np.testing.assert_array_equal(every, np.arange(reader.total, dtype=np.float64))
  names = [n for r in rules for n, _ in r.hub]
  assert set(names) == set(shapes)
  if found.fused:  # gate and up of one block each read their half of gate_up_proj
    shared = {n for n in names if names.count(n) > 1}
    assert shared and all(n.endswith("experts.gate_up_proj") for n in shared)
    assert all(names.count(n) == 2 for n in shared)
  else:  # per-expert: the rules' tensor sets are disjoint, and export writes them back
    assert len(names) == len(set(names))
    for r in rules:
      written = r.write(r.read(reader, None))
      assert sorted(written) == sorted(n for n, _ in r.hub)
      for n, w in written.items():
        np.testing.assert_array_equal(w, reader.ids[n])
