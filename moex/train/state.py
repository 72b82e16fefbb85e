"""The train state: a plain dict pytree that orbax saves and jit donates.

  {"step": int32 [], "params": {...}, "buffers": {...}, "opt_state": optax state,
   "rng": uint32 [2]}

`params` are every nnx.Param value (with LoRA adapters, the adapters and the frozen base
weights side by side); `buffers` every other NNX variable (state a router keeps outside the
optimizer). Both are pure dicts; `nnx.merge(graphdef, params, buffers)` rebuilds the model
inside a jitted function. `opt_state` tracks the trainable parameters only
(lora.partition: all of them without adapters, else the adapters).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from moex.config import Config
from moex.model import lora
from moex.model.decoder import Decoder
from moex.parallel import sharding

nnx.use_eager_sharding(False)  # Shardings come from the config's rules, applied at init.


@dataclasses.dataclass(frozen=True)
class Model:
  """What the step functions need to rebuild the model, and the state's shardings."""

  graphdef: Any
  state_shardings: Any  # Same structure as the train state, NamedSharding leaves.
  abstract_state: Any  # jax.ShapeDtypeStruct leaves with shardings (orbax restore target).


def _split(model: Decoder):
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  return graphdef, params, buffers


def _state(cfg: Config, params: dict, buffers: dict, tx: optax.GradientTransformation,
           key) -> dict:
  """A step-0 train state: fresh optimizer state (of the trainable parameters), the RNG of
  `key`."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "buffers": buffers,
          "opt_state": tx.init(lora.partition(params, cfg.lora)[0]),
          "rng": jax.random.key_data(key)}


def decoder(cfg: Config, rngs: nnx.Rngs) -> Decoder:
  """The config's model, with its adapters (cfg.lora)."""
  return Decoder(cfg.model, cfg.moe, rngs, cfg.lora)


def _abstract(cfg: Config, mesh: Mesh):
  """(graphdef, abstract params, abstract buffers, param shardings, buffer shardings)."""
  abstract = nnx.eval_shape(lambda: decoder(cfg, nnx.Rngs(0)))
  graphdef, abs_params, abs_buffers = _split(abstract)
  rules = cfg.mesh.rules
  return (graphdef, abs_params, abs_buffers, sharding.state_shardings(abs_params, rules, mesh),
          sharding.state_shardings(abs_buffers, rules, mesh))


def abstract_variables(cfg: Config, mesh: Mesh) -> tuple[Any, dict, dict]:
  """(graphdef, params, buffers) as pure dicts of jax.ShapeDtypeStruct with shardings: the
  model's layout without allocating it (checkpoint import and export fill it)."""
  graphdef, abs_params, abs_buffers, param_sh, buffer_sh = _abstract(cfg, mesh)
  with_sh = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  return (graphdef, jax.tree.map(with_sh, nnx.to_pure_dict(abs_params), param_sh),
          jax.tree.map(with_sh, nnx.to_pure_dict(abs_buffers), buffer_sh))


def build(cfg: Config, tx: optax.GradientTransformation, mesh: Mesh):
  """Returns (Model, init_fn): init_fn(seed) -> a freshly initialised, sharded state."""
  graphdef, _, _, param_sh, buffer_sh = _abstract(cfg, mesh)
  rep = sharding.replicated(mesh)

  def init(key):
    model = decoder(cfg, nnx.Rngs(key))
    _, params, buffers = _split(model)
    return _state(cfg, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers), tx, key)

  abs_state = jax.eval_shape(init, jax.random.PRNGKey(0))
  # Optimizer moments are sharded like the parameters they track; scalars replicated.
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_state["opt_state"],
                                 lora.partition(param_sh, cfg.lora)[0],
                                 transform_non_params=lambda _: rep)
  state_sh = {"step": rep, "params": param_sh, "buffers": buffer_sh, "opt_state": opt_sh,
              "rng": rep}
  abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           abs_state, state_sh)
  init_fn = jax.jit(lambda seed: init(jax.random.PRNGKey(seed)), out_shardings=state_sh)
  return Model(graphdef, state_sh, abs_state), init_fn


def start_from(cfg: Config, model: Model, tx: optax.GradientTransformation, params: dict,
               buffers: dict, seed: int) -> dict:
  """The step-0 state around given parameters and buffers (train.init_from): the optimizer
  state initialised on them and the RNG of `seed`, as init_fn(seed) makes them, placed on
  the state's shardings. `params` and `buffers` are donated."""
  sh = model.state_shardings
  make = jax.jit(lambda p, b: _state(cfg, p, b, tx, jax.random.PRNGKey(seed)),
                 in_shardings=(sh["params"], sh["buffers"]), out_shardings=sh,
                 donate_argnums=(0, 1))
  return make(params, buffers)


def param_count(state: dict) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(state["params"]))


def trainable_count(cfg: Config, params: dict) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(lora.partition(params, cfg.lora)[0]))
