"""What each device holds to train a config on a mesh, computed without allocating anything
(the library of python -m moex.footprint, moex/footprint.py).

`describe` gives the command's text: total and active parameters (moex/model/params.py
counts), then per device: parameters, gradients, optimizer state, an activation estimate,
their sum and, with --device_memory_gb (GiB), whether it fits.

Exact: parameters (moex/model/params.py, the one parameter tree) and optimizer state (the
trainer's own abstract state, moex/train/state.py build(); jax.eval_shape only), with their
shardings from mesh.rules, on an AbstractMesh of the config's mesh shape (a -1 axis
resolved from --devices), so no device is needed; a device holds prod(dim / split) elements
of each array, the split of a dimension being the product of the mesh axes in its
PartitionSpec. Gradients are one more copy of the parameters (two with
train.grad_accum_steps > 1: the running sum and one micro-batch's).

Estimated: activations, in the compute dtype (c bytes; router logits and the output logits
in float32), per device and micro-batch of b = data.batch_size / (grad_accum_steps x batch
shards) sequences of L = data.seq_len tokens, T = b L. Head counts h, j and hidden widths f
are per device (split by the tensor axis when the rules split them). R = rows the MoE layer's
experts process here: K T when dropless on one expert rank, X P on X expert ranks (the
padded buffer: P = T K, or moe.ep_buffer_factor x T K / X), E b C on the capacity path.
  block, all it keeps:  attention c T (4D + (h + 2j) A + h A) + c b h L^2 (the XLA
                        attention's probabilities; a flash kernel keeps none)
                        + MoE c R (2D + 3f) + c T D + 8 T E, or a dense FFN c T (3f + D)
  per block under model.remat: none = all of the above; full = its input c T D;
                        dots_saveable = the matmul outputs (q, k, v, scores, attention
                        output, projections, expert gate/up/down); dots_with_no_batch_dims_
                        saveable = the projections and the router (not attention's batched
                        matmuls, nor the experts', which are batched over experts)
  with remat, one block recomputed at a time: + that block's full set
  outside the blocks:   embedding output and final norm 2 c T D, logits and their gradient
                        8 T V
  gathered weights:     with fsdp > 1, one block's weights and their gradient gathered
                        whole (2 x (gathered - sharded bytes) of the largest block)
Not counted: XLA's temporary buffers, fusion copies, the all-to-all send/receive copies,
the data pipeline and the compiled program.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections
from jax.sharding import AbstractMesh

from moex import config as config_lib, errors, workdir as workdir_lib
from moex.moe import dispatch, parallel as moe_parallel
from moex.parallel import mesh as mesh_lib, sharding
from moex.model import params
from moex.model import lora
from moex.train import optimizer, state as state_lib

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Term:
  """One part of the activation estimate: its name, formula and bytes per device."""

  name: str
  formula: str
  bytes: int


@dataclasses.dataclass(frozen=True)
class Footprint:
  """Per-device bytes of a config on a mesh (moex.footprint's docstring says how)."""

  mesh: dict[str, int]
  total_params: int
  active_params: int
  embedding_params: int  # embedding + unembedding, counted in both totals
  param_bytes: dict[str, int]  # by part (moex.model.params.PARTS)
  param_dtypes: tuple[str, ...]
  grad_bytes: int
  opt_bytes: int
  opt_dtypes: tuple[str, ...]
  activations: tuple[Term, ...]
  tokens: tuple[int, int]  # (b sequences, L tokens) per device and micro-batch
  adapter_bytes: int = 0  # LoRA adapters (lora.rank > 0), beside the base's param_bytes
  trainable_params: int = 0  # what the optimizer updates (all parameters without adapters)
  full: "Footprint | None" = None  # with adapters: a full fine-tune of the same model

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.values())

  @property
  def activation_bytes(self) -> int:
    return sum(t.bytes for t in self.activations)

  @property
  def total_bytes(self) -> int:
    return sum(self.param_bytes.values()) + self.adapter_bytes + self.grad_bytes + (
        self.opt_bytes + self.activation_bytes)


def _bytes(leaf, sizes: dict[str, int]) -> int:
  """Bytes of one device's shard of an abstract array with a sharding."""
  return params.shard_elements(leaf.shape, leaf.sharding.spec, sizes) * leaf.dtype.itemsize


def footprint(cfg: config_lib.Config, devices: int) -> Footprint:
  """The per-device footprint of training `cfg` on `devices` devices (ConfigError when the
  mesh does not fit them or the layout does not divide)."""
  sizes = mesh_lib.resolve_shape(cfg.mesh, devices)
  mesh = AbstractMesh(tuple(sizes[a] for a in config_lib.MESH_AXES), config_lib.MESH_AXES)
  mesh_lib.check_layout(cfg, mesh, process_count=1)
  tx, _ = optimizer.make(cfg.opt, cfg.train.steps)
  model, _ = state_lib.build(cfg, tx, mesh)
  leaves = params.tree(cfg)
  param_bytes = params.device_bytes(leaves, cfg.mesh.rules, mesh)
  opt = jax.tree.leaves(model.abstract_state["opt_state"])
  counts = params.counts(cfg)
  accum = cfg.train.grad_accum_steps
  b = cfg.data.batch_size // accum // sharding.batch_shards(cfg.mesh.rules, mesh)
  # Gradients exist for the trainable leaves only (all of them without adapters).
  abstract = model.abstract_state["params"]
  trainable = jax.tree.leaves(lora.partition(abstract, cfg.lora)[0])
  adapters = jax.tree.leaves(lora.adapters_of(abstract))
  full = None
  if cfg.lora.enabled:
    full = footprint(dataclasses.replace(cfg, lora=config_lib.LoRAConfig()), devices)
  return Footprint(
      mesh=sizes,
      total_params=sum(c.total for c in counts.values()),
      active_params=sum(c.active for c in counts.values()),
      embedding_params=counts["embedding"].total + counts["unembedding"].total,
      param_bytes=param_bytes,
      param_dtypes=_dtypes(leaves),
      grad_bytes=(sum(_bytes(x, sizes) for x in trainable) if cfg.lora.enabled
                  else sum(param_bytes.values())) * (2 if accum > 1 else 1),
      opt_bytes=sum(_bytes(x, sizes) for x in opt),
      opt_dtypes=_dtypes(x for x in opt if x.ndim),
      activations=_activations(cfg, mesh, b, leaves),
      tokens=(b, cfg.data.seq_len),
      adapter_bytes=sum(_bytes(x, sizes) for x in adapters),
      trainable_params=sum(math.prod(x.shape) for x in trainable), full=full)


def _dtypes(leaves) -> tuple[str, ...]:
  return tuple(sorted({leaf.dtype.name for leaf in leaves}))


def _moe_rows(cfg: config_lib.Config, mesh, b: int) -> tuple[int, str]:
  """Rows the experts of one MoE layer process on a device, and how they come about."""
  m, l = cfg.moe, cfg.data.seq_len
  plan = dispatch.plan(m, True, l)
  if dispatch.PATHS[plan.path].capacity_bound:  # else dropless: the grouped exchange
    return m.num_experts * b * plan.capacity, f"E b C, C = {plan.capacity}"
  ranks = sharding.split_size("expert", cfg.mesh.rules, mesh)
  rows = m.top_k * b * l
  if ranks == 1:
    return rows, "K T"
  pair = moe_parallel.pair_rows(rows, ranks, m.ep_buffer_factor)
  return ranks * pair, f"X P = {ranks} x {pair} (padded dropless buffer)"


def _block_bytes(cfg: config_lib.Config, mesh, b: int) -> dict[str, tuple[int, int]]:
  """{"moe" | "dense": (bytes a block keeps with no remat, with model.remat's dots policy)}
  on one device (formulas in the module docstring)."""
  m, e = cfg.model, cfg.moe

  def local(n: int, logical: str) -> int:  # n split like logical axis `logical`, if it divides
    s = sharding.split_size(logical, cfg.mesh.rules, mesh)
    return n // s if n % s == 0 else n

  c = jax.numpy.dtype(m.dtype).itemsize
  l, d, a = cfg.data.seq_len, m.d_model, m.head_dim
  t = b * l
  h, j = local(m.num_heads, "heads"), local(m.num_kv_heads, "kv_heads")
  f_e, f_d = local(e.d_expert, "expert_mlp"), local(m.d_ff, "mlp")
  f_s = local(e.num_shared_experts * (e.d_shared or e.d_expert), "mlp")
  rows, _ = _moe_rows(cfg, mesh, b)
  scores = c * b * h * l * l
  attn = c * t * (4 * d + (h + 2 * j) * a + h * a) + scores
  shared = c * t * (3 * f_s + d) if f_s else 0
  moe = c * rows * (2 * d + 3 * f_e) + c * t * d + 8 * t * e.num_experts + shared
  dense = c * t * (3 * f_d + d)
  # Matmul outputs only: the projections and the router; dots_saveable also the batched ones.
  dots_attn = c * t * ((h + 2 * j) * a + d)
  dots_moe = 4 * t * e.num_experts + (c * t * (2 * f_s + d) if f_s else 0)
  if m.remat == "dots_saveable":
    dots_attn += c * t * h * a + scores
    dots_moe += c * rows * (2 * f_e + d)
  return {"moe": (attn + moe, dots_attn + dots_moe),
          "dense": (attn + dense, dots_attn + c * t * (2 * f_d + d))}


def _activations(cfg: config_lib.Config, mesh, b: int, leaves) -> tuple[Term, ...]:
  """The activation estimate's terms (formulas in the module docstring)."""
  m = cfg.model
  c = jax.numpy.dtype(m.dtype).itemsize
  t = b * cfg.data.seq_len
  blocks = _block_bytes(cfg, mesh, b)
  counts = {"moe": len(m.moe_layers), "dense": m.num_layers - len(m.moe_layers)}
  if m.remat == "none":
    kept = {k: blocks[k][0] for k in blocks}
  elif m.remat == "full":
    kept = dict.fromkeys(blocks, c * t * m.d_model)
  else:
    kept = {k: blocks[k][1] for k in blocks}
  rows, rows_how = _moe_rows(cfg, mesh, b)
  terms = [Term(f"blocks, kept for the backward (remat={m.remat})",
                f"{counts['moe']} MoE + {counts['dense']} dense blocks; MoE rows R = "
                f"{rows_how} = {rows:,}", sum(counts[k] * kept[k] for k in blocks))]
  if m.remat != "none":
    worst = max(blocks[k][0] for k in blocks if counts[k])
    terms.append(Term("one block recomputed in the backward", "its full set, as remat=none",
                      worst))
  v = m.vocab_size // sharding.split_size("vocab", cfg.mesh.rules, mesh)
  terms.append(Term("embedding output, final norm, logits", "2 c T D + 8 T V",
                    2 * c * t * m.d_model + 8 * t * v))
  if mesh.shape["fsdp"] > 1:
    terms.append(Term("one block's weights gathered over fsdp", "2 x (gathered - sharded)",
                      2 * _largest_block_gather(leaves, cfg.mesh.rules, mesh)))
  return tuple(terms)


def _largest_block_gather(leaves, rules, mesh) -> int:
  """Extra bytes on a device when the largest block's weights are gathered over fsdp."""
  extra: dict[int, int] = {}
  for leaf in leaves:
    if leaf.layer is not None:
      gathered = leaf.device_bytes(rules, mesh, skip=("fsdp",))
      extra[leaf.layer] = extra.get(leaf.layer, 0) + gathered - leaf.device_bytes(rules, mesh)
  return max(extra.values(), default=0)


def _gib(n: int) -> str:
  return f"{n / GIB:9.2f} GiB"


def report(fp: Footprint, name: str, memory_gib: float | None = None) -> str:
  """The command's output: counts, then per-device bytes line by line."""
  shape = " ".join(f"{a}={s}" for a, s in fp.mesh.items())
  b, l = fp.tokens
  params = sum(fp.param_bytes.values())
  lines = [
      f"{name} on {fp.devices} devices, mesh {shape}",
      f"parameters: {fp.total_params / 1e9:.2f}B total, {fp.active_params / 1e9:.2f}B active "
      f"per token ({fp.total_params:,} / {fp.active_params:,}; both include the embedding "
      f"and unembedding, {fp.embedding_params / 1e9:.2f}B)",
      "per device:",
      f"  parameters         {_gib(params)}  ({', '.join(fp.param_dtypes)})",
      f"    routed experts   {_gib(fp.param_bytes['routed_experts'])}",
      f"    everything else  {_gib(params - fp.param_bytes['routed_experts'])}",
      *([f"  LoRA adapters      {_gib(fp.adapter_bytes)}  ({fp.trainable_params:,} "
         "trainable parameters)"] if fp.full is not None else []),
      f"  gradients          {_gib(fp.grad_bytes)}  (the "
      f"{'trainable parameters' if fp.full is not None else 'parameters'}' dtype and "
      "shards)",
      f"  optimizer state    {_gib(fp.opt_bytes)}  (AdamW mu and nu: "
      f"{', '.join(fp.opt_dtypes)}, sharded like the parameters)",
      f"  activations        {_gib(fp.activation_bytes)}  (an estimate: {b} sequences x {l} "
      f"tokens per device and micro-batch)"]
  for term in fp.activations:
    lines.append(f"    {term.name}: {term.bytes / GIB:.2f} GiB  [{term.formula}]")
  lines.append(f"  total              {_gib(fp.total_bytes)}")
  if fp.full is not None:
    f = fp.full
    lines.append(f"a full fine-tune of the same model: gradients {_gib(f.grad_bytes)}, "
                 f"optimizer state {_gib(f.opt_bytes)}, total {_gib(f.total_bytes)} per device")
  if memory_gib is not None:
    used = fp.total_bytes / (memory_gib * GIB)
    verdict = "fits" if used <= 1 else "does not fit"
    lines.append(f"{verdict} in {memory_gib:g} GiB per device ({used:.0%} of it)")
  return "\n".join(lines)


class FootprintError(ValueError, errors.Refusal):
  """A bad --devices or --device_memory_gb (one line; moex.footprint exits 2)."""


def device_count(cfg: config_lib.Config, given: int | None) -> int:
  """`given`, else the mesh's own size; FootprintError when a -1 axis needs `given`."""
  if given is not None:
    if given < 1:
      raise FootprintError(f"--devices={given}: must be at least 1")
    return given
  unknown = [a for a, s in cfg.mesh.shape.items() if s == -1]
  if unknown:
    raise FootprintError(f"--devices: needed to resolve mesh.{unknown[0]}=-1")
  return math.prod(cfg.mesh.shape.values())


def describe(cd: ml_collections.ConfigDict, name: str, devices: int | None = None,
             memory_gib: float | None = None) -> str:
  """moex.footprint's output for the config `cd` (named `name`) on `devices` devices.

  model.vocab_size 0 is the tokenizer's (loaded only then). ConfigError or FootprintError,
  one line, on a bad config, mesh or memory size.
  """
  if memory_gib is not None and not (math.isfinite(memory_gib) and memory_gib > 0):
    raise FootprintError(f"--device_memory_gb={memory_gib}: must be a finite number of GiB "
                         "above 0")
  cfg = workdir_lib.validate(cd, check_tokenizer=False)
  return report(footprint(cfg, device_count(cfg, devices)), name, memory_gib)
