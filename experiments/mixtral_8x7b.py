"""Mixtral 8x7B at its real shapes: 46.7B parameters, 12.9B active per token (Jiang et al. 2024).

Training it needs a pod (its bf16 parameters alone are 93 GB). What each device would hold
on a mesh, computed without allocating anything:

  python -m moex.footprint --config=experiments/mixtral_8x7b.py --devices=64
  python -m moex.footprint --config=experiments/mixtral_8x7b.py --devices=256 \
      --config.mesh.expert=8 --device_memory_gb=95

On 64 devices (fsdp=8, expert=8, 4 sequences of 4096 per device, remat=full) that is 1.7 GiB
of parameters, as much of gradients, 3.4 GiB of AdamW state and an estimated 39 GiB of
activations, 30 GiB of which is the one block being recomputed: its padded dropless
expert-parallel buffer holds 8 x the real rows (moe.ep_buffer_factor=0, which never
overflows; 2.0 cuts it 4x and counts what overflows).

Set the tokenizer before training: data.tokenizer is left empty here, for the Mixtral
tokenizer the run is given (--config.data.tokenizer=/path/to/mixtral/tokenizer.json). To
fine-tune imported weights, point train.init_from at the workdir that holds them:

  python -m moex.main --config=experiments/mixtral_8x7b.py --workdir=gs://BUCKET/mixtral_ft \
      --config.data.tokenizer=/path/to/mixtral/tokenizer.json \
      --config.train.init_from=gs://BUCKET/mixtral_imported

Every field not set here is tiny.py's (and commented there).
"""

import ml_collections

from experiments import tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Mixtral 8x7B; `arg` is unused."""
  del arg
  c = tiny.get_config()

  m = c.model
  m.vocab_size = 32_000  # Mixtral's SentencePiece vocabulary.
  m.d_model = 4096
  m.num_layers = 32
  m.num_heads = 32
  m.num_kv_heads = 8  # Grouped-query attention: 4 query heads per key/value head.
  m.head_dim = 128
  m.d_ff = 14_336  # Unused: every layer is MoE (kept equal to the expert width).
  m.rope_theta = 1e6
  m.norm_eps = 1e-5
  m.dtype = "bfloat16"  # Compute in bf16; router math stays float32.
  m.param_dtype = "bfloat16"  # Parameters (and so AdamW's moments, optax's default) in bf16.
  m.remat = "full"  # Keep only each block's input; recompute the rest in the backward pass.

  e = c.moe
  e.num_experts = 8
  e.top_k = 2
  e.d_expert = 14_336
  e.router = "topk_softmax"  # Mixtral: softmax over the top-2 logits.
  e.dispatch = "dropless"  # Sorted rows and a grouped matmul: no token is ever dropped.
  e.load_balance_weight = 1e-3  # router_aux_loss_coef of Hugging Face's MixtralConfig.
  e.z_loss_weight = 0.0  # Mixtral has none.

  d = c.data
  d.tokenizer = ""  # Set it: --config.data.tokenizer=/path/to/mixtral/tokenizer.json.
  d.seq_len = 4096
  d.batch_size = 256  # 1M tokens per step; divisible by the batch shards of the mesh.
  d.eval_batches = 16

  o = c.opt
  o.learning_rate = 3e-4  # A Llama-2-like recipe: Mixtral's own was not published.
  o.warmup_steps = 2000
  o.schedule = "wsd"  # Extends cleanly when train.steps grows (WORKSPACE.md, Running).
  o.b2 = 0.95
  o.weight_decay = 0.1

  t = c.train
  t.steps = 100_000
  t.log_every = 10
  t.eval_every = 1000
  t.checkpoint_every = 1000
  t.progress_seconds = 60.0

  mesh = c.mesh
  mesh.data = 1
  mesh.fsdp = -1  # Parameters and the batch over the rest of the pod.
  mesh.expert = 8  # One expert per rank; the all-to-alls stay inside groups of 8.
  return c
