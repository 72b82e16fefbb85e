"""Hugging Face architecture families: config.json <-> moex config, and tensor <-> parameter.

One family is one class in its own file (families/NAME.py, a `base.Family` subclass: its
config keys, the keys it accepts only at their neutral value, its expert names and layouts,
and the hooks where it differs); `FAMILIES` below registers it. What all share (the decoder's
keys and tensor table) is base.py.
"""

from __future__ import annotations

from moex.config import ModelConfig, MoEConfig
from moex.interop.families import base, llama, mistral, mixtral, olmoe, qwen3_moe
from moex.interop.families.base import Family, Layout, Tensor, Unsupported

__all__ = ["FAMILIES", "Family", "Layout", "Tensor", "Unsupported", "family_of", "from_moex",
           "to_moex"]

# Registration order is the export default's order: the first whose kind fits.
FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    mixtral.FAMILY, qwen3_moe.FAMILY, olmoe.FAMILY, llama.FAMILY, mistral.FAMILY)}


def family_of(hf: dict, file: str) -> Family:
  archs = hf.get("architectures") or []
  if len(archs) != 1 or archs[0] not in FAMILIES:
    raise Unsupported(f"{file}: architectures={archs!r} is not supported (moex reads "
                      f"{', '.join(FAMILIES)})")
  return FAMILIES[archs[0]]


def to_moex(hf: dict, file: str) -> tuple[Family, dict, dict]:
  """(family, model section, moe section) for moex from a config.json dict."""
  fam = family_of(hf, file)
  model, moe = fam.to_moex(hf, file)
  return fam, model, moe


def default_family(model: ModelConfig) -> Family:
  """The first registered family of the model's kind (MoE or dense) and q/k norm."""
  kind = [f for f in FAMILIES.values() if f.moe == bool(model.moe_layers)]
  return next((f for f in kind if f.qk_norm == model.qk_norm), kind[0])


def from_moex(model: ModelConfig, moe: MoEConfig, architecture: str | None = None) -> tuple[
    Family, dict]:
  """(family, config.json dict) for a moex model; refuses what the family cannot express."""
  if architecture is not None and architecture not in FAMILIES:
    raise Unsupported(f"--architecture: {architecture!r} is not one of {', '.join(FAMILIES)}")
  fam = FAMILIES[architecture] if architecture is not None else default_family(model)
  return fam, fam.from_moex(model, moe)
