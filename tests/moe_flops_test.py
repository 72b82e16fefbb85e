"""Executed FLOPs of each MoE dispatch path against the work that must be done.

XLA's cost analysis of MoEBlock's compiled forward, divided by the analytic
6*T*K*D*F (three expert matmuls per assignment) + 2*T*D*E (router), as
moex/bench/moe_layer.py reports it. A path that quietly computes densely shows a ratio
near E; these tests pin each path's ratio to what its design allows.

Only compiled, never run: the shape can be realistic (T = 10 x 250 tokens) at no cost.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moex import config
from moex.moe import gmm
from moex.moe.layer import MoEBlock

nnx.use_eager_sharding(False)

B, L, D, F, E, K = 10, 250, 64, 128, 8, 2
T, M = B * L, B * L * K  # tokens, assignments
ANALYTIC = 6 * T * K * D * F + 2 * T * D * E
# Besides the matmuls XLA counts the router softmax / top-k, silu, the combine and index
# arithmetic: about 2-3% of ANALYTIC at this shape.
OVERHEAD = 0.05


def _model_cfg() -> config.ModelConfig:
  return config.ModelConfig(
      vocab_size=256, d_model=D, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=32,
      d_ff=K * F, first_dense_layers=0, moe_every=1, rope_theta=1e4, norm_eps=1e-6,
      init_std=0.02, dtype="float32", param_dtype="float32")


def _flop_ratio(**moe_overrides) -> float:
  """Cost-analysis FLOPs of the training forward / ANALYTIC (compiled, not run)."""
  moe = config.MoEConfig(num_experts=E, top_k=K, d_expert=F, min_capacity=0, **moe_overrides)
  abstract = nnx.eval_shape(lambda: MoEBlock(_model_cfg(), moe, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=True)[0])
  cost = fwd.lower(state, jax.ShapeDtypeStruct((B, L, D), jnp.float32)).compile()
  cost = cost.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"] / ANALYTIC


@pytest.mark.parametrize("cf", [1.25, 2.0])
def test_capacity_path_costs_the_capacity_factor(cf):
  # E buffers of C = ceil(cf * L * K / E) rows per sequence: cf times the assignments.
  c = config.MoEConfig(num_experts=E, top_k=K, min_capacity=0).capacity(L, cf)
  assert c > 4  # flaxformer's min_capacity=4 would not dominate here either
  ratio = _flop_ratio(dispatch="capacity", capacity_factor=cf)
  assert cf <= ratio <= cf + 0.1, ratio
  assert ratio == pytest.approx(E * B * c / M, abs=OVERHEAD)


def test_ragged_dot_is_dense_on_cpu_only():
  ratio = _flop_ratio(dispatch="dropless", grouped_matmul="ragged_dot")
  if jax.default_backend() == "cpu":
    # XLA:CPU lowers ragged_dot to a masked dense dot over every group: E times the work
    # (documented in moex/moe/gmm.py; "auto" picks "chunked" on CPU for this reason).
    assert 0.95 * E <= ratio <= 1.05 * E, ratio
  else:
    assert 1.0 <= ratio <= 1.0 + OVERHEAD, ratio


def test_tiled_path_pays_only_its_padding():
  tile = gmm.default_tile(M, E)
  assert tile == 32
  ratio = _flop_ratio(dispatch="dropless", grouped_matmul="tiled")
  # ceil(M / tile) + E tiles of `tile` rows: padding at most E * tile rows. Each tile also
  # gathers its expert's [D, F] weights, which XLA counts as one FLOP per element
  # (1 / (2 * tile) of that tile's matmul).
  rows_bound = 1 + E * tile / M
  assert 1.0 <= ratio <= rows_bound * (1 + 1 / (2 * tile)) + OVERHEAD, ratio
  assert ratio <= 1.1


def test_chunked_path_with_loop_trip_correction():
  # XLA's cost analysis counts a while-loop body once: the chunked loops show one chunk of
  # each of the three matmuls. Add the chunks the loops really run for this routing, as
  # moex/bench/moe_layer.py _chunked_loop_correction does.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(T, D))
  w_router = rng.normal(size=(D, E)) * 0.02  # the block's init scale (init_std)
  top_TxK = np.argsort(-(x @ w_router), axis=-1, kind="stable")[:, :K]
  sizes_E = np.bincount(top_TxK.ravel(), minlength=E)
  chunk = gmm.default_chunk(M, E)
  rows = int(gmm.chunked_executed_rows(jnp.asarray(sizes_E), chunk))
  assert rows == int(np.sum(-(-sizes_E // chunk))) * chunk
  assert M <= rows <= M + E * chunk
  raw = _flop_ratio(dispatch="dropless", grouped_matmul="chunked")
  assert raw < 0.25  # the body once: far below the real work
  ratio = raw + 3 * (rows - chunk) * 2 * D * F / ANALYTIC
  assert rows / M <= ratio <= rows / M + OVERHEAD, (ratio, rows / M)
  assert ratio <= 1.1, ratio
