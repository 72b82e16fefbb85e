"""Packed rows (moex/model/decoder.py, layers.py, moex/moe/*, moex/train/step.py): several
documents in one row with segment ids, positions and padding.

Packed equals separate: every document's logits inside a packed row equal the logits of
that document run alone, float32, for a dense model and an MoE model (dropless evaluation;
the training capacity path with a capacity that drops nothing). Padding is invisible: the
same documents with more, less or different padding give the same loss, gradients and MoE
statistics. data.document_mask / data.document_positions switch the mask and positions.
"""

import dataclasses
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from moe_reference import JIT_OPTIONS
import multidevice_run

from experiments import tiny
from moex import config as config_lib
from moex.parallel import mesh as mesh_lib, sharding
from moex.train import optimizer, state as state_lib, step as step_lib

VOCAB = 64
L = 32  # model input length of a packed row
# Document lengths per packed row (the rest of the row is padding). Two lengths only, so
# the documents run alone compile twice.
ROWS = ((8, 12, 8), (12, 12), (8,))
TOL = 1e-5  # max |logit difference|, float32 (the bound)
SCRIPT = pathlib.Path(__file__).parent / "multidevice" / "segments_mesh.py"


def _cfg(dense=False, **moe) -> config_lib.Config:
  cd = tiny.get_config()
  cd.model.update(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, d_ff=48, init_std=0.3)
  cd.moe.update(num_experts=8, top_k=2, d_expert=16, grouped_matmul="chunked")
  if dense:
    cd.model.first_dense_layers = cd.model.num_layers
  cd.moe.update(moe)
  cd.data.update(seq_len=L, batch_size=len(ROWS))
  return config_lib.validate(cd)


def _build(cfg):
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
  tx, _ = optimizer.make(cfg.opt, 10)
  model, init_fn = state_lib.build(cfg, tx, mesh)
  return model.graphdef, init_fn(0), tx


def _docs(seed=0):
  """Random documents, one list per packed row."""
  rng = np.random.default_rng(seed)
  return [[rng.integers(1, VOCAB, n).astype(np.int32) for n in row] for row in ROWS]


def pack(docs_rows, length, pad_token=0):
  """(tokens, segment_ids, positions) [B, length] int32: each row's documents in order,
  then padding (segment 0, position 0, token `pad_token`)."""
  b = len(docs_rows)
  tokens = np.full((b, length), pad_token, np.int32)
  seg = np.zeros((b, length), np.int32)
  pos = np.zeros((b, length), np.int32)
  for i, docs in enumerate(docs_rows):
    at = 0
    for k, doc in enumerate(docs):
      tokens[i, at:at + len(doc)] = doc
      seg[i, at:at + len(doc)] = k + 1
      pos[i, at:at + len(doc)] = np.arange(len(doc))
      at += len(doc)
  return tokens, seg, pos


def _apply(graphdef, params, buffers, tokens, seg, pos, train, document_mask):
  model = nnx.merge(graphdef, params, buffers)
  kw = {} if seg is None else {"segment_ids_BxL": seg, "positions_BxL": pos,
                               "document_mask": document_mask}
  logits, moe = model(tokens, train=train, rng=jax.random.PRNGKey(3) if train else None,
                      **kw)
  return logits, {} if moe is None else moe.stats


_run = jax.jit(_apply, static_argnums=(0, 6, 7), **JIT_OPTIONS)


def logits(cfg_state, tokens, seg=None, pos=None, train=False, document_mask=True):
  graphdef, state, _ = cfg_state
  out, stats = _run(graphdef, state["params"], state["buffers"], tokens, seg, pos, train,
                    document_mask)
  return np.asarray(out), jax.tree.map(np.asarray, stats)


def alone(cfg_state, docs_rows, train=False):
  """Each document run alone (its own row, no segment ids): {(row, k): logits [n, V]},
  and the summed expert loads of those runs."""
  by_len = {}
  for i, docs in enumerate(docs_rows):
    for k, doc in enumerate(docs):
      by_len.setdefault(len(doc), []).append(((i, k), doc))
  out, load = {}, 0
  for items in by_len.values():
    got, stats = logits(cfg_state, np.stack([d for _, d in items]), train=train)
    for j, (key, _) in enumerate(items):
      out[key] = got[j]
    if stats:
      load = load + stats["expert_load"]
  return out, load


def max_delta(packed, docs_rows, separate):
  """Largest |packed - alone| over every document's positions."""
  worst = 0.0
  for i, docs in enumerate(docs_rows):
    at = 0
    for k, doc in enumerate(docs):
      worst = max(worst, float(np.max(np.abs(packed[i, at:at + len(doc)] - separate[i, k]))))
      at += len(doc)
  return worst


CASES = {
    "dense": (dict(dense=True), False),
    "moe_dropless": ({}, False),  # evaluation: dropless
    "moe_capacity": (dict(dispatch="capacity", capacity_factor=4.0), True),  # C >= S: no drop
    "moe_capacity_probability": (dict(dispatch="capacity", capacity_factor=4.0,
                                      drop_policy="probability"), True),
    "moe_sigmoid_bias": (dict(router="sigmoid_bias"), False),
    "moe_shared_expert": (dict(num_shared_experts=1), False),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_equals_separate(case):
  overrides, train = CASES[case]
  built = _build(_cfg(**overrides))
  docs_rows = _docs()
  tokens, seg, pos = pack(docs_rows, L)
  packed, stats = logits(built, tokens, seg, pos, train=train)
  separate, load = alone(built, docs_rows, train=train)
  delta = max_delta(packed, docs_rows, separate)
  print(f"{case}: packed vs separate max |dlogit| = {delta:.2e}")
  assert delta <= TOL, f"{case}: packed logits differ from separate by {delta:.2e}"
  if stats:  # routing saw each document as alone: the same loads, only real tokens
    np.testing.assert_array_equal(stats["expert_load"], load)
    real = sum(map(sum, ROWS))
    assert stats["expert_load"].sum(-1).tolist() == [real * 2] * 2
    np.testing.assert_array_equal(stats["expert_kept"], stats["expert_load"])
  # Negative control: without segment ids the later documents see the earlier ones.
  plain, _ = logits(built, tokens, train=train)
  assert max_delta(plain, docs_rows, separate) > 1e-3


def _second_document(built, docs, train):
  """Logits of docs[1] packed after docs[0], and after as much padding instead."""
  tokens, seg, pos = pack([docs], L)
  packed, _ = logits(built, tokens, seg, pos, train=train)
  n0, n1 = len(docs[0]), len(docs[1])
  tokens[0, :n0], seg[0, :n0], pos[0, :n0] = 0, 0, 0  # the first document made padding
  after_pad, stats = logits(built, tokens, seg, pos, train=train)
  return packed[0, n0:n0 + n1], after_pad[0, n0:n0 + n1], stats


@pytest.mark.slow
def test_documents_of_a_row_share_its_capacity_and_padding_takes_none():
  """Capacity is per packed row: at capacity factor 1 a document gets other results after
  another document than after the same number of padding tokens (which take no slot); at a
  capacity that drops nothing, the same results."""
  docs = _docs()[1]  # two documents of 12 tokens
  small = _build(_cfg(dispatch="capacity", capacity_factor=1.0, min_capacity=0))
  shared, alone_after_pad, stats = _second_document(small, docs, train=True)
  assert np.max(np.abs(shared - alone_after_pad)) > 1e-4
  assert stats["expert_load"].sum() == 2 * 2 * len(docs[1])  # padding routes nothing
  large = _build(_cfg(dispatch="capacity", capacity_factor=4.0))
  shared, alone_after_pad, _ = _second_document(large, docs, train=True)
  assert np.max(np.abs(shared - alone_after_pad)) <= TOL


@pytest.mark.slow
def test_padding_tokens_change_nothing():
  """Whatever the padding holds (its token ids), real tokens' logits and every MoE
  statistic stay the same; loads count real tokens only."""
  built = _build(_cfg(dispatch="capacity", capacity_factor=1.0))
  docs_rows = _docs()
  a = pack(docs_rows, L, pad_token=0)
  b = pack(docs_rows, L, pad_token=VOCAB - 1)
  for train in (False, True):
    la, sa = logits(built, *a, train=train)
    lb, sb = logits(built, *b, train=train)
    real = a[1] != 0
    np.testing.assert_array_equal(la[real], lb[real])
    for k in sa:
      np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    assert sa["expert_load"].sum() == 2 * 2 * real.sum()  # 2 layers, K = 2


def _batch(docs_rows, length, pad_token=0):
  """A train batch dict of [B, length + 1] arrays."""
  tokens, seg, pos = pack(docs_rows, length + 1, pad_token)
  return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def _loss(graphdef, cfg, params, buffers, batch):
  return step_lib.loss_fn(params, buffers, batch, jax.random.PRNGKey(0), graphdef=graphdef,
                          cfg=cfg)


_loss_grads = jax.jit(jax.value_and_grad(_loss, argnums=2, has_aux=True),
                      static_argnums=(0, 1), **JIT_OPTIONS)


def _loss_and_grads(built, cfg, batch):
  graphdef, state, _ = built
  (loss, aux), grads = _loss_grads(graphdef, cfg, state["params"], state["buffers"], batch)
  return float(loss), jax.tree.map(np.asarray, aux), jax.tree.map(np.asarray, grads)


@pytest.mark.slow
@pytest.mark.parametrize("dense", [False, True])
def test_padding_removed_gives_the_same_loss_grads_and_stats(dense):
  """The same rows with 9 more padding positions each: the same loss (cross-entropy and
  balancing terms), gradients and MoE statistics as without them (dropless training)."""
  cfg = _cfg(dense=dense, dispatch="dropless", seq_load_balance_weight=0.1)
  built = _build(cfg)
  docs_rows = [[d for d in docs] for docs in _docs(1)]
  # Inputs hold every real token (the targets row is one longer: its last entry is padding).
  tight = max(sum(map(len, docs)) for docs in docs_rows)
  short, aux_s, grads_s = _loss_and_grads(built, cfg, _batch(docs_rows, tight))
  padded, aux_p, grads_p = _loss_and_grads(built, cfg, _batch(docs_rows, tight + 9, 5))
  np.testing.assert_allclose(padded, short, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_s)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  if not dense:
    for k in ("expert_load", "expert_kept", "max_group_load", "cooccurrence"):
      np.testing.assert_array_equal(aux_p["moe"][k], aux_s["moe"][k], err_msg=k)
    for k in ("load_balance_loss", "seq_load_balance_loss", "z_loss", "entropy_sum",
              "topk_margin_sum"):
      np.testing.assert_allclose(aux_p["moe"][k], aux_s["moe"][k], rtol=1e-5, err_msg=k)
    assert aux_p["load_balance_loss"] > 0 and aux_p["z_loss"] > 0


@pytest.mark.slow
def test_loss_is_the_mean_over_documents_targets():
  """The packed loss = the documents' cross-entropies run alone, weighted by their
  targets (n - 1 each: a document's last token predicts nothing inside it)."""
  cfg = _cfg(dense=True)
  built = _build(cfg)
  docs_rows = _docs(2)
  _, aux, _ = _loss_and_grads(built, cfg, _batch(docs_rows, L))
  total, count = 0.0, 0
  for n in sorted({len(doc) for docs in docs_rows for doc in docs}):
    same = np.stack([doc for docs in docs_rows for doc in docs if len(doc) == n])
    _, aux1, _ = _loss_and_grads(built, cfg, {"tokens": same})  # mean over their targets
    total += float(aux1["cross_entropy"]) * same.shape[0] * (n - 1)
    count += same.shape[0] * (n - 1)
  np.testing.assert_allclose(float(aux["cross_entropy"]), total / count, rtol=1e-5)


def test_target_weights_follow_the_contract():
  seg = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
  w = np.asarray(step_lib.target_weights(seg))
  # The EOS closing document 1 (index 2) is a target of index 1; index 2's target (the
  # next document's first token) is not; padding targets nothing.
  np.testing.assert_array_equal(w, [[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  assert int(step_lib.num_targets({"tokens": seg, "segment_ids": seg,
                                   "positions": seg})) == 9
  assert int(step_lib.num_targets(seg)) == 12


@pytest.mark.slow
def test_document_flags():
  """data.document_mask=False: attention over the whole row, as without segment ids
  (with document_positions=False too, exactly the unpacked forward); the first document
  still equals its run alone, later ones do not. document_positions=False with the mask
  on: RoPE scores depend only on the offset between positions, so inside one document
  a constant shift changes the logits only by rounding."""
  built = _build(_cfg())
  docs_rows = _docs()
  tokens, seg, pos = pack(docs_rows, L)
  separate, _ = alone(built, docs_rows)
  plain, plain_stats = logits(built, tokens)
  arange = np.broadcast_to(np.arange(L, dtype=np.int32), tokens.shape)
  # Both off: the unpacked forward (padding is at the row's end, after every real token).
  off, off_stats = logits(built, tokens, seg, arange, document_mask=False)
  real = seg != 0
  np.testing.assert_allclose(off[real], plain[real], atol=1e-6)
  assert off_stats["expert_load"].sum() < plain_stats["expert_load"].sum()  # no padding
  # Mask off, positions on: positions restart, attention crosses documents.
  crossed, _ = logits(built, tokens, seg, pos, document_mask=False)
  for i, docs in enumerate(docs_rows):
    n = len(docs[0])
    assert np.max(np.abs(crossed[i, :n] - separate[i, 0])) <= TOL
  assert max_delta(crossed, docs_rows, separate) > 1e-3
  assert np.max(np.abs(crossed[real] - off[real])) > 1e-3
  # Mask on, positions off (0..L-1 along the row): equal up to rounding.
  shifted, _ = logits(built, tokens, seg, arange)
  assert max_delta(shifted, docs_rows, separate) <= 1e-4


@pytest.mark.slow
def test_expert_choice_refuses_segment_ids():
  built = _build(_cfg(router="expert_choice", allow_noncausal_routing=True))
  tokens, seg, pos = pack(_docs(), L)
  with pytest.raises(config_lib.ConfigError, match="moe.router: expert_choice"):
    logits(built, tokens, seg, pos)


@pytest.mark.slow
def test_packed_train_step_and_accumulation():
  """The jitted train step on a packed batch dict: finite, counts real targets, and three
  micro-batches give the same step as one (weighted cross-entropy over the whole batch)."""
  results = {}
  for accum in (1, 3):
    cfg = _cfg(load_balance_weight=0.0, z_loss_weight=0.0, dispatch="dropless")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                             grad_accum_steps=accum))
    graphdef, state, tx = _build(cfg)
    batch = _batch(_docs(3), L)
    with sharding.use_rules(cfg.mesh.rules):
      core, _ = step_lib.make_train_step(cfg, graphdef, tx)
      new_state, metrics = jax.jit(core)(state, batch)
    results[accum] = (jax.tree.map(np.asarray, new_state["params"]),
                      jax.tree.map(np.asarray, metrics))
  (p1, m1), (p3, m3) = results[1], results[3]
  assert int(m1["scalars"]["targets"]) == sum(n - 1 for row in ROWS for n in row)
  assert np.isfinite(m1["scalars"]["loss"])
  for k in ("cross_entropy", "grad_norm"):
    np.testing.assert_allclose(m3["scalars"][k], m1["scalars"][k], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(p3), jax.tree.leaves(p1)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(m3["moe"]["expert_load"], m1["moe"]["expert_load"])


@pytest.mark.slow
def test_expert_parallel_packed_logits_match_one_device():
  """tests/multidevice/segments_mesh.py on 8 simulated devices: packed rows with masks on
  (expert=8), (data=2, expert=4) meshes give the one-device logits (to 1e-5 of their
  largest magnitude), loss and counts, capacity and dropless paths."""
  stdout, rows = multidevice_run.run(SCRIPT.name)
  assert len(rows) == 4, stdout
  for row in rows:  # reductions split over devices: relative to the logits' magnitude
    assert row["logits"] <= TOL * row["logit_scale"], row
    assert row["loss"] <= 1e-5, row
    assert row["counts_equal"], row
    assert row["real_tokens_only"], row
