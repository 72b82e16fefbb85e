"""A planned model as a moex experiment: widths and depth for its active parameters.

Depth and width follow d_model ~ 64 x num_layers (Krajewski et al.'s aspect ratio, close
to GPT-3's and Llama's at these sizes), head width 64 (128 from d_model 1024), SwiGLU width
8/3 d_model rounded to 64 (12 d^2 per block with attention, as the laws' FLOPs assume); the
depth whose moex active-parameter count (moex.model.params.counts, embeddings included)
is closest to the plan's is chosen. Experts: the joint law's E as E experts of the FFN's
width, top-1; Krajewski's G as 64 G experts of width d_ff / G, top-G; dense: no MoE layer.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from moex import config as config_lib
from moex.scaling import laws, plan
from moex.model import params

MAX_LAYERS = 160
TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "experiments", "tiny.py")  # the base of the written experiment


def base_config() -> ml_collections.ConfigDict:
  """experiments/tiny.py's config (loaded by path: experiments/ is not a package)."""
  spec = importlib.util.spec_from_file_location("moex_scaling_tiny", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _round(x: float, unit: int) -> int:
  return max(unit, int(round(x / unit)) * unit)


def shape(layers: int, p: plan.Plan, law: laws.Law) -> dict:
  """The model/moe fields of a `layers`-deep model for the plan."""
  head_dim = 128 if 64 * layers >= 1024 else 64
  d = _round(64 * layers, head_dim)
  d_ff = _round(8 * d / 3, 64)
  s = {"d_model": d, "num_layers": layers, "head_dim": head_dim, "num_heads": d // head_dim,
       "num_kv_heads": d // head_dim, "d_ff": d_ff, "first_dense_layers": layers,
       "num_experts": 8, "top_k": 2, "d_expert": d_ff // 2}
  if law.form == "krajewski":
    g = int(p.granularity)
    s.update(first_dense_layers=0, num_experts=64 * g, top_k=g, d_expert=_round(d_ff / g, 8))
  elif law.moe and round(p.experts) > 1:
    s.update(first_dense_layers=0, num_experts=int(round(p.experts)), top_k=1, d_expert=d_ff)
  return s


def config_of(s: dict, vocab_size: int, seq_len: int,
              base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = base.copy_and_resolve_references()
  for k in ("d_model", "num_layers", "head_dim", "num_heads", "num_kv_heads", "d_ff",
            "first_dense_layers"):
    c.model[k] = s[k]
  c.model.vocab_size = vocab_size
  for k in ("num_experts", "top_k", "d_expert"):
    c.moe[k] = s[k]
  c.data.seq_len = seq_len
  return c


def active(s: dict, vocab_size: int, seq_len: int, base: ml_collections.ConfigDict) -> float:
  """moex's active-parameter count of the shape."""
  cfg = config_lib.validate(config_of(s, vocab_size, seq_len, base))
  return float(sum(c.active for c in params.counts(cfg).values()))


def shape_for(p: plan.Plan, law: laws.Law, vocab_size: int, seq_len: int) -> dict:
  """The shape whose active parameters are closest to the plan's (in ratio)."""
  best, gap, base = None, float("inf"), base_config()
  for layers in range(1, MAX_LAYERS + 1):
    s = shape(layers, p, law)
    n = active(s, vocab_size, seq_len, base)
    if abs(n / p.n_active - 1) < gap:
      best, gap = {**s, "n_active": n}, abs(n / p.n_active - 1)
    if n >= p.n_active:  # the count grows with depth (and width): no deeper shape is closer
      break
  return best


def render(s: dict, steps: int, batch_size: int, seq_len: int, vocab_size: int,
           command: str, p: plan.Plan) -> str:
  """The experiment file's text."""
  moe = s["first_dense_layers"] == 0
  lines = [
      f'"""Written by `{command}`.', "",
      f"The plan: {p.n_active:.3g} active parameters, {p.tokens:.3g} tokens, predicted loss "
      f"{p.loss:.4f}", f"(the law's units). This model: {s['n_active']:.4g} active parameters "
      "(moex.model.params.counts),",
      f"{steps} steps of {batch_size} x {seq_len} tokens. Set data.tokenizer to a tokenizer of "
      f"{vocab_size} ids.", "",
      "  python -m moex.main --config=THIS_FILE --workdir=workdirs/planned", '"""', "",
      "from experiments import tiny", "", "",
      "def get_config(arg: str | None = None):",
      '  """The planned model on experiments/tiny.py\'s data, optimizer and mesh sections."""',
      "  del arg", "  c = tiny.get_config()"]
  for k in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
            "first_dense_layers"):
    lines.append(f"  c.model.{k} = {s[k]}")
  lines += [f"  c.model.vocab_size = {vocab_size}", '  c.model.dtype = "bfloat16"']
  if moe:
    for k in ("num_experts", "top_k", "d_expert"):
      lines.append(f"  c.moe.{k} = {s[k]}")
    lines.append('  c.moe.dispatch = "dropless"')
  lines += [f"  c.data.seq_len = {seq_len}", f"  c.data.batch_size = {batch_size}",
            f"  c.train.steps = {steps}",
            f"  c.opt.warmup_steps = {min(2000, max(1, steps // 20))}",
            "  return c", ""]
  return "\n".join(lines)
