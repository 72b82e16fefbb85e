"""moex/bench/generate.py: the three models' shapes, the bytes a decode step must read, and
the tables and figure built from measured rows (no timing here: hand-made rows)."""

import numpy as np
from flax import nnx

from moex.bench import generate as bench

nnx.use_eager_sharding(False)


def test_models_have_the_moe_active_and_total_widths():
  d, f, layers, vocab = 64, 96, 2, 128
  moe = bench.model_config("moe", d, f, layers, vocab)
  active = bench.model_config("dense_active", d, f, layers, vocab)
  total = bench.model_config("dense_total", d, f, layers, vocab)
  assert moe.model.moe_layers == (0, 1) and (moe.moe.num_experts, moe.moe.top_k) == (8, 2)
  assert not active.model.moe_layers and active.model.d_ff == 2 * f
  assert not total.model.moe_layers and total.model.d_ff == 8 * f
  assert moe.model.num_heads == 1 and moe.model.head_dim == 64


def test_weight_bytes_split_experts_embedding_and_the_rest():
  cfg = bench.model_config("moe", 64, 96, 2, 128)
  params = {"embed": {"table_VxD": np.zeros((128, 64), np.float32)},
            "unembed_DxV": np.zeros((64, 128), np.float32),
            "block_0": {"ffn": {"experts": {"gate_ExDxF": np.zeros((8, 64, 96), np.float32),
                                            "up_ExDxF": np.zeros((8, 64, 96), np.float32),
                                            "down_ExFxD": np.zeros((8, 96, 64), np.float32)}},
                        "attn": {"q": np.zeros((64, 64), np.float32)}},
            "block_1": {"ffn": {"experts": {"gate_ExDxF": np.zeros((8, 64, 96), np.float32),
                                            "up_ExDxF": np.zeros((8, 64, 96), np.float32),
                                            "down_ExFxD": np.zeros((8, 96, 64), np.float32)}}}}
  wb = bench.weight_bytes(cfg, params)
  per_expert = 3 * 64 * 96 * 4
  assert wb["per_expert"] == per_expert and wb["experts"] == 2 * 8 * per_expert
  assert wb["embed"] == 128 * 64 * 4 and wb["embed_row"] == 64 * 4
  assert wb["always"] == (64 * 128 + 64 * 64) * 4  # unembedding + attention
  assert wb["total"] == wb["always"] + wb["experts"] + wb["embed"]


def _row(model, batch, step_ms, bound_ms=1.0):
  return {"model": model, "weights_mb": 10.0, "batch": batch, "path": "gather",
          "prefill_tokens_per_s": 100.0, "decode_step_ms": step_ms,
          "decode_tokens_per_s": batch / step_ms * 1e3, "step_bytes": 2**20,
          "bound_ms": bound_ms, "vs_bound": step_ms / bound_ms}


ROWS = [_row("moe", 1, 3.0), _row("dense_active", 1, 2.5), _row("dense_total", 1, 7.5),
        _row("moe_grouped", 1, 9.0), _row("moe", 8, 8.0), _row("dense_active", 8, 4.0),
        _row("dense_total", 8, 16.0)]


def test_ratios_and_table():
  q = bench.ratios(ROWS)
  assert q[0] == {"batch": 1, "moe_vs_dense_active": 1.2, "moe_vs_dense_total": 0.4,
                  "moe_vs_moe_grouped": 3.0 / 9.0}
  assert q[1] == {"batch": 8, "moe_vs_dense_active": 2.0, "moe_vs_dense_total": 0.5}
  text = bench.markdown(ROWS, {"bytes_per_s": 2e10, "jax_sum": 2e10, "numpy_sum": 1.5e10})
  assert text.startswith("read bandwidth 20.0 GB/s (jax sum 20.0, numpy sum 15.0)")
  assert "| 1 | 1.20 | 0.40 | 0.33 |" in text and "| 8 | 2.00 | 0.50 | – |" in text
  assert "| moe | 10 MB | 1 | gather | 100 | 3.00 | 333.3 | 1 MB | 1.00 | 3.00 |" in text


def test_figure_is_written(tmp_path):
  path = tmp_path / "decode.png"
  bench.figure(ROWS, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
