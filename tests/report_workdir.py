"""A hand-written workdir (2 MoE layers, E=4, K=2, one sequence of S=40 tokens per window)
for the moex.report, moex.compare and moex.sweep tests."""

import json

E, K, S = 4, 2, 40  # a sequence's expert at capacity factor 1 holds S * K / E = 20
TRAIN_STEPS = (10, 20, 30)
EVAL_STEPS = (0, 30)


def load_hist(load: list[int], unit: float = S * K / E, bin_width: float = 0.05) -> dict:
  """sequence_load_hist of one sequence with these per-expert loads (as moex.moe.stats);
  `unit`: S * K / E, an expert's load at capacity factor 1."""
  bins = [min(int(n / unit / bin_width + 1e-9), 160) for n in load]
  counts, sums = [0] * (max(bins) + 1), [0] * (max(bins) + 1)
  for b, n in zip(bins, load):
    counts[b] += 1
    sums[b] += n
  return {"bin_width": bin_width, "counts": counts, "load_sums": sums}


def moe_line(step, split, layer, load, cf=1.25, legacy=False, hist=True, **extra):
  """One moe_stats.jsonl record; `legacy`: without tokens_per_group and min_capacity (records
  written before them); `hist=False`: without sequence_load_hist (older still)."""
  kept = [min(n, 25) for n in load] if cf else list(load)
  rec = {
      "step": step, "split": split, "layer": layer, "tokens": sum(load) // K, "num_experts": E,
      "top_k": K, "dispatch": "capacity" if cf else "dropless", "capacity": 25 if cf else None,
      "capacity_factor": cf, "expert_load": load, "expert_kept": kept,
      "dropped_fraction": 1 - sum(kept) / sum(load), "needed_capacity_factor": 2.5,
      "router_entropy": 1.2, "load_balance_loss": 1.1, "z_loss": 0.5,
      "seq_load_balance_loss": 1.1, "train_capacity": 25, "train_capacity_factor": 1.25,
      "train_capacity_dropped_fraction": 0.05,
  }
  if hist:
    rec["sequence_load_hist"] = load_hist(load)
  if not legacy:
    rec.update(tokens_per_group=S, min_capacity=0)
  rec.update(extra)
  return rec


def write_workdir(path, cf=1.25, torn=True, legacy=False, hist=True, config=None):
  """metrics.jsonl, moe_stats.jsonl (torn last line), config.json; layer 1 ends dead.

  `config`: config.json's contents (default: the moe section and data.seq_len = S).
  """
  metrics = [{"step": s, "split": "train", "loss": 3.0 - 0.1 * s / 10, "cross_entropy": 2.9,
              "learning_rate": 1e-3, "grad_norm": 1.0} for s in TRAIN_STEPS]
  metrics += [{"step": s, "split": "eval", "loss": 3.0, "bits_per_byte": 4.0 - s / 30,
               "grad_norm": None} for s in EVAL_STEPS]
  kw = {"legacy": legacy, "hist": hist}
  moe = []
  for s in TRAIN_STEPS:
    moe.append(moe_line(s, "train", 0, [20, 20, 20, 20], cf, topk_margin=0.3, **kw))
    moe.append(moe_line(s, "train", 1, [40, 20, 20, 0] if s == 30 else [30, 20, 20, 10], cf,
                        topk_margin=0.2, overload_factor=1.5, **kw))
  for s in EVAL_STEPS:
    for layer in (0, 1):
      moe.append(moe_line(s, "eval", layer, [25, 25, 15, 15], None, **kw))
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
  text = "".join(json.dumps(r) + "\n" for r in moe)
  if torn:
    text += json.dumps(moe_line(40, "train", 0, [20, 20, 20, 20], cf))[:50]
  (path / "moe_stats.jsonl").write_text(text)
  if config is None:
    config = {"moe": {"num_experts": E, "top_k": K, "capacity_factor": cf or 1.25,
                      "min_capacity": 0, "dispatch": "capacity" if cf else "dropless"},
              "data": {"seq_len": S}}
  (path / "config.json").write_text(json.dumps(config))
  return str(path)
