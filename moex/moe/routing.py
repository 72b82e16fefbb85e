"""Routers: router logits -> which K experts each token goes to, and with what weight.

Shape letters: G groups (sequences), S tokens per group, D model width, E experts,
K experts per token. All router math is float32 whatever the compute dtype.

A router is one entry of ROUTERS, the one list of router names: a `RouterSpec` holding its
function `(logits [G, S, E], cfg, ctx) -> Routing` and what the rest of moex asks of it
(causal, packed rows, a bias to update, whether its weights sum to moe.routed_scaling,
whether its routes can be replayed, its own dispatch path, its config checks). The layer,
dispatch.plan, config validation, generation and upcycling read these fields, never the
router's name. Token-choice routers fill expert_index/combine_weight [G, S, K]; expert
choice, whose decision is per expert, leaves them empty (K = 0) and fills the per-expert
token lists [G, E, C] instead, which only its own dispatch path reads (moex/moe/dispatch.py).

| name          | choice                              | weight of a chosen expert        | paper |
|---------------|-------------------------------------|----------------------------------|-------|
| topk_softmax  | top-k logits                        | softmax over those k             | Mixtral (Jiang et al. 2024) |
| softmax_topk  | top-k of softmax over all E         | that probability (renormalize=True: / sum of the k) | GShard (Lepikhin et al. 2020) |
| switch        | top-1 of softmax                    | that probability                 | Switch (Fedus et al. 2021) |
| sigmoid_bias  | top-k of sigmoid + bias, in the best topk_groups of num_groups groups | sigmoid score / sum of chosen scores * routed_scaling | DeepSeek-V3 (2024), aux-loss-free balancing (Wang et al. 2024) |
| hash          | k consecutive experts from a hash of the token id | 1/k            | Hash layers (Roller et al. 2021) |
| random        | k experts uniformly at random (eval: fixed per token id) | 1/k         | baseline |
| expert_choice | each expert: its top-C tokens | their probability | Zhou et al. 2022 |
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moex.config import ConfigError, MoEConfig


class Routing(NamedTuple):
  """A router's decision for every token (token choice) or every expert (expert choice)."""

  expert_index_GxSxK: jax.Array  # int32, the k-th choice of each token (best first).
  combine_weight_GxSxK: jax.Array  # float32, weight of each choice in the output sum.
  probs_GxSxE: jax.Array  # float32, the router's distribution over all experts.
  logits_GxSxE: jax.Array  # float32, raw router logits (for the z-loss).
  token_GxExC: jax.Array | None = None  # expert choice: the C tokens each expert takes.
  weight_GxExC: jax.Array | None = None  # expert choice: the weight of each of them.
  # Real tokens (False: padding of a packed row, which takes no capacity slot, is not
  # counted in any statistic or balancing term and gets no routed output); None: all are.
  valid_GxS: jax.Array | None = None

  @property
  def expert_choice(self) -> bool:
    return self.token_GxExC is not None

  def first_choice_GxS(self) -> jax.Array:
    """Each token's first-choice expert (its top router probability for expert choice,
    where tokens make no choice), -1 on padding; the probe behind moe_stats'
    routing_churn."""
    if self.expert_index_GxSxK.shape[-1]:
      first_GxS = self.expert_index_GxSxK[..., 0].astype(jnp.int32)
    else:
      first_GxS = jnp.argmax(self.probs_GxSxE, axis=-1).astype(jnp.int32)
    return first_GxS if self.valid_GxS is None else jnp.where(self.valid_GxS, first_GxS, -1)


class Context(NamedTuple):
  """What some routers need besides the logits."""

  train: bool
  rng: jax.Array | None = None  # random router (per step in training, fixed at eval)
  tokens_GxS: jax.Array | None = None  # hash router
  bias_E: jax.Array | None = None  # sigmoid_bias router
  capacity: int | None = None  # expert_choice: tokens each expert takes per group


def topk_softmax(logits_GxSxE, cfg: MoEConfig, ctx: Context) -> Routing:
  """Mixtral: choose the top-k logits, softmax over those k only."""
  del ctx
  top_logits_GxSxK, index_GxSxK = jax.lax.top_k(logits_GxSxE, cfg.top_k)
  return Routing(index_GxSxK.astype(jnp.int32),
                 jax.nn.softmax(top_logits_GxSxK, axis=-1) * cfg.routed_scaling,
                 jax.nn.softmax(logits_GxSxE, axis=-1), logits_GxSxE)


def softmax_topk(logits_GxSxE, cfg: MoEConfig, ctx: Context) -> Routing:
  """GShard / Switch order: softmax over all experts, then take the top-k probabilities."""
  del ctx
  probs_GxSxE = jax.nn.softmax(logits_GxSxE, axis=-1)
  top_p_GxSxK, index_GxSxK = jax.lax.top_k(probs_GxSxE, cfg.top_k)
  if cfg.renormalize:
    top_p_GxSxK = top_p_GxSxK / jnp.sum(top_p_GxSxK, axis=-1, keepdims=True)
  return Routing(index_GxSxK.astype(jnp.int32), top_p_GxSxK * cfg.routed_scaling,
                 probs_GxSxE, logits_GxSxE)


def switch(logits_GxSxE, cfg: MoEConfig, ctx: Context) -> Routing:
  """Switch Transformer: top-1 of the softmax, weighted by its probability."""
  return softmax_topk(logits_GxSxE, cfg, ctx)  # config checks top_k == 1, no renormalize


def group_limited_mask(choice_GxSxE: jax.Array, num_groups: int, topk_groups: int):
  """True for experts in each token's best `topk_groups` of `num_groups` expert groups.

  A group's score is the sum of its two best choice scores (DeepSeek-V3), or its best
  score when groups hold one expert.
  """
  g, s, e = choice_GxSxE.shape
  per_group = e // num_groups
  grouped_GxSxOxI = choice_GxSxE.reshape(g, s, num_groups, per_group)
  best = jax.lax.top_k(grouped_GxSxOxI, min(2, per_group))[0]
  group_score_GxSxO = jnp.sum(best, axis=-1)
  _, top_groups = jax.lax.top_k(group_score_GxSxO, topk_groups)
  keep_GxSxO = jnp.any(jax.nn.one_hot(top_groups, num_groups, dtype=bool), axis=-2)
  return jnp.repeat(keep_GxSxO, per_group, axis=-1)


def sigmoid_bias(logits_GxSxE, cfg: MoEConfig, ctx: Context) -> Routing:
  """DeepSeek-V3: sigmoid scores; a balancing bias (not trained) changes only the choice."""
  scores_GxSxE = jax.nn.sigmoid(logits_GxSxE)
  choice_GxSxE = scores_GxSxE + jax.lax.stop_gradient(ctx.bias_E)
  if cfg.num_groups > 1:
    keep = group_limited_mask(choice_GxSxE, cfg.num_groups, cfg.topk_groups)
    choice_GxSxE = jnp.where(keep, choice_GxSxE, -jnp.inf)
  _, index_GxSxK = jax.lax.top_k(choice_GxSxE, cfg.top_k)
  chosen_GxSxK = jnp.take_along_axis(scores_GxSxE, index_GxSxK, axis=-1)
  weight_GxSxK = chosen_GxSxK / jnp.sum(chosen_GxSxK, axis=-1, keepdims=True)
  probs_GxSxE = scores_GxSxE / jnp.sum(scores_GxSxE, axis=-1, keepdims=True)
  return Routing(index_GxSxK.astype(jnp.int32), weight_GxSxK * cfg.routed_scaling,
                 probs_GxSxE, logits_GxSxE)


def _uniform_routing(index_GxSxK, logits_GxSxE, cfg: MoEConfig) -> Routing:
  """Fixed (non-learned) choices with equal weights; probs spread evenly over them."""
  k, e = cfg.top_k, logits_GxSxE.shape[-1]
  chosen_GxSxE = jnp.sum(jax.nn.one_hot(index_GxSxK, e), axis=-2)
  return Routing(index_GxSxK.astype(jnp.int32),
                 jnp.full(index_GxSxK.shape, cfg.routed_scaling / k, jnp.float32),
                 chosen_GxSxE / k, logits_GxSxE)


def hash_router(logits_GxSxE, cfg: MoEConfig, ctx: Context) -> Routing:
  """Hash layers: a token id always goes to the same k consecutive experts."""
  e = logits_GxSxE.shape[-1]
  h_GxS = (ctx.tokens_GxS.astype(jnp.uint32) * jnp.uint32(2654435761)) >> jnp.uint32(7)
  first_GxS = (h_GxS % jnp.uint32(e)).astype(jnp.int32)
  index_GxSxK = (first_GxS[..., None] + jnp.arange(cfg.top_k, dtype=jnp.int32)) % e
  return _uniform_routing(index_GxSxK, logits_GxSxE, cfg)


def random_router(logits_GxSxE, cfg: MoEConfig, ctx: Context) -> Routing:
  """k distinct experts uniformly at random: fresh each training step; at eval a fixed
  draw per token id, so a token's experts do not depend on the batch's shape (cached
  decoding routes as the full forward does)."""
  if ctx.train:
    noise_GxSxE = jax.random.uniform(ctx.rng, logits_GxSxE.shape)
  else:
    e = logits_GxSxE.shape[-1]
    draw = lambda token: jax.random.uniform(jax.random.fold_in(ctx.rng, token), (e,))
    noise_GxSxE = jax.vmap(jax.vmap(draw))(ctx.tokens_GxS.astype(jnp.uint32))
  _, index_GxSxK = jax.lax.top_k(noise_GxSxE, cfg.top_k)
  return _uniform_routing(index_GxSxK, logits_GxSxE, cfg)


def expert_choice(logits_GxSxE, cfg: MoEConfig, ctx: Context) -> Routing:
  """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of each group.

  Non-causal: the ranking of a sequence's tokens uses the whole sequence (moex/config.py
  refuses it for a causal decoder without moe.allow_noncausal_routing).
  """
  del cfg
  g, s, _ = logits_GxSxE.shape
  probs_GxSxE = jax.nn.softmax(logits_GxSxE, axis=-1)
  c = min(ctx.capacity, s)
  weight_GxExC, token_GxExC = jax.lax.top_k(probs_GxSxE.transpose(0, 2, 1), c)
  empty_GxSx0 = jnp.zeros((g, s, 0), jnp.int32)
  return Routing(empty_GxSx0, empty_GxSx0.astype(jnp.float32), probs_GxSxE, logits_GxSxE,
                 token_GxExC.astype(jnp.int32), weight_GxExC)


RouterFn = Callable[[jax.Array, MoEConfig, Context], Routing]


def _require(ok: bool, key: str, reason: str) -> None:
  if not ok:
    raise ConfigError(f"{key}: {reason}")


def _check_switch(moe: MoEConfig) -> None:
  _require(moe.top_k == 1, "moe.top_k",
           f"the switch router sends each token to 1 expert, got {moe.top_k}")
  _require(not moe.renormalize, "moe.renormalize",
           "the switch router weights its one expert by p; renormalizing makes it 1 and cuts "
           "the router's gradient")


def _check_groups(moe: MoEConfig) -> None:
  """Group-limited routing: num_groups divides E, and the chosen groups hold top_k experts."""
  _require(moe.num_groups >= 1 and moe.num_experts % moe.num_groups == 0, "moe.num_groups",
           f"{moe.num_groups} must divide moe.num_experts={moe.num_experts}")
  _require(1 <= moe.topk_groups <= moe.num_groups, "moe.topk_groups",
           f"must be in [1, moe.num_groups={moe.num_groups}]")
  per_group = moe.num_experts // moe.num_groups
  _require(moe.top_k <= moe.topk_groups * per_group, "moe.top_k",
           f"{moe.top_k} exceeds the {moe.topk_groups * per_group} experts in the "
           f"moe.topk_groups={moe.topk_groups} chosen groups")


def _always(moe: MoEConfig) -> bool:
  del moe
  return True


def _never(moe: MoEConfig) -> bool:
  del moe
  return False


@dataclasses.dataclass(frozen=True)
class RouterSpec:
  """A router: its function and what the layer, plan, config, generation and upcycling ask
  of it. Calling the spec calls the function."""

  fn: RouterFn
  # Whether every token's combine weights sum to moe.routed_scaling (copy upcycling is
  # then exact); a function of the config where an option decides it.
  sums_to_scaling: Callable[[MoEConfig], bool] = _always
  # A token's routing depends on no later token (expert choice ranks the whole sequence:
  # refused for a causal decoder without moe.allow_noncausal_routing, and for generation).
  causal: bool = True
  # Routes each token on its own, so a packed row's documents (segment ids) never see
  # each other (expert choice ranks the whole row: refused there).
  packed_rows: bool = True
  # Keeps a per-expert bias (routing.RouterBias, outside the optimizer) that aux-loss-free
  # balancing updates after each training step (ctx.bias_E).
  has_bias: bool = False
  # Its routes (each token's experts) can be recorded and replayed in a later pass (router
  # replay in post-training): the choice is per token and the weights follow from the
  # logits. Expert choice decides per expert, hash from the token id alone.
  replayable: bool = True
  # Uses moe.num_groups / moe.topk_groups (group-limited routing).
  group_limited: bool = False
  # With top_k a multiple of M, M experts with equal router columns (copies) are chosen
  # together and share one weight (expand and granular upcycling are then exact).
  ties_chosen_together: bool = False
  # Chooses k consecutive experts (granular upcycling is exact: any G of them are the G
  # shards of the dense FFN).
  consecutive: bool = False
  # The dispatch path its decisions need (a dispatch.PATHS key); None: token choice, the
  # plan chooses (moe.dispatch, train/eval, the call's shape).
  path: str | None = None
  # Its own config refusals (ConfigError lines naming the key); run by config.validate.
  check: Callable[[MoEConfig], None] | None = None

  def __call__(self, logits_GxSxE: jax.Array, cfg: MoEConfig, ctx: Context) -> Routing:
    return self.fn(logits_GxSxE, cfg, ctx)


ROUTERS: dict[str, RouterSpec] = {
    "topk_softmax": RouterSpec(topk_softmax, ties_chosen_together=True),
    "softmax_topk": RouterSpec(softmax_topk, sums_to_scaling=lambda moe: moe.renormalize,
                               ties_chosen_together=True),
    # Its one weight is p < 1; top_k is 1, so no two copies are chosen together.
    "switch": RouterSpec(switch, sums_to_scaling=_never, check=_check_switch),
    "sigmoid_bias": RouterSpec(sigmoid_bias, has_bias=True, group_limited=True,
                               ties_chosen_together=True, check=_check_groups),
    "hash": RouterSpec(hash_router, replayable=False, consecutive=True),
    "random": RouterSpec(random_router),
    "expert_choice": RouterSpec(expert_choice, sums_to_scaling=_never, causal=False,
                                packed_rows=False, replayable=False, path="expert_choice"),
}


def names(has: Callable[[RouterSpec], bool]) -> tuple[str, ...]:
  """The routers whose spec satisfies `has`, in ROUTERS order."""
  return tuple(name for name, spec in ROUTERS.items() if has(spec))


def update_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """Aux-loss-free balancing step: bias += rate * sign(mean load - load_e)."""
  load = load_E.astype(jnp.float32)
  return bias_E + rate * jnp.sign(jnp.mean(load) - load)


class RouterBias(nnx.Variable):
  """Per-expert routing bias: state outside the optimizer, saved in checkpoints."""


class Router(nnx.Module):
  """The gate: a float32 linear map from token to one logit per expert (+ optional bias)."""

  def __init__(self, d_model: int, num_experts: int, init_std: float, rngs: nnx.Rngs,
               with_bias: bool = False):
    init = nnx.initializers.normal(stddev=init_std)
    self.kernel_DxE = nnx.Param(init(rngs.params(), (d_model, num_experts), jnp.float32),
                                out_sharding=("embed", None))
    self.bias_E = RouterBias(jnp.zeros((num_experts,), jnp.float32)) if with_bias else None

  def __call__(self, x_GxSxD: jax.Array) -> jax.Array:
    return jnp.einsum("gsd,de->gse", x_GxSxD.astype(jnp.float32),
                      self.kernel_DxE[...].astype(jnp.float32))
