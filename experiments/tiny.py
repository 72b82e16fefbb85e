"""The default experiment: a tiny Mixtral-style MoE LM on the Python standard library.

Runs in about 5 minutes on a 2-core CPU, needs no download:

  python -m moex.main --config=experiments/tiny.py --workdir=/tmp/moex/tiny

Variants are overrides, e.g. the dropless dispatch path:

  python -m moex.main --config=experiments/tiny.py --workdir=/tmp/moex/tiny_dropless \
      --config.moe.dispatch=dropless

Re-running with the same --workdir resumes from the latest checkpoint; a larger
--config.train.steps continues training past the first run's end.
"""

import dataclasses

import ml_collections

from moex import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the tiny MoE config; `arg` is unused (kept for big_vision-style variants)."""
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, data shuffling and router noise.

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 0  # 0 = the tokenizer's vocabulary size (259 for "byte").
  m.d_model = 128  # Residual stream width D.
  m.num_layers = 4  # Decoder blocks.
  m.num_heads = 4  # Query heads H.
  m.num_kv_heads = 2  # Key/value heads (grouped-query attention); divides num_heads.
  m.head_dim = 32  # Per-head width A.
  m.d_ff = 512  # Hidden width F of the dense SwiGLU blocks (layers that are not MoE).
  m.first_dense_layers = 0  # The first N blocks use a dense feed-forward block.
  m.moe_every = 1  # After those, every Nth block is MoE (1 = all of them).
  m.rope_theta = 10_000.0  # Rotary position embedding base.
  m.norm_eps = 1e-6  # RMSNorm epsilon.
  m.init_std = 0.02  # Stddev of the normal initializers (output projections scaled down).
  m.dtype = "float32"  # Compute dtype (bfloat16 on accelerators); router stays float32.
  m.param_dtype = "float32"  # Parameter storage dtype.
  m.remat = "none"  # Rematerialize each block in the backward pass: "none", "full", or a
  # jax.checkpoint_policies name ("dots_saveable", "dots_with_no_batch_dims_saveable").
  m.qk_norm = "none"  # RMSNorm on queries and keys before RoPE: "none", "head" (one [A]
  # scale shared by all heads, Qwen3) or "full" (over all heads' width, OLMoE).
  m.dense_layers = ()  # Blocks that stay dense whatever first_dense_layers/moe_every say.

  # Every MoE field starts at its default in moex/config.py MoEConfig, which documents each
  # one (and the whole section stays overridable: --config.moe.jitter=0.1). Set here are
  # this experiment's choices.
  c.moe = e = ml_collections.ConfigDict(dataclasses.asdict(config_lib.MoEConfig()))
  e.num_experts = 8  # Experts E per MoE layer.
  e.top_k = 2  # Experts K each token is sent to.
  e.d_expert = 256  # Hidden width of each SwiGLU expert.
  e.router = "topk_softmax"  # Softmax over all experts, then the top K.
  e.dispatch = "capacity"  # Fixed per-expert buffers; overflowing tokens are dropped.
  e.capacity_factor = 1.25  # C = max(ceil(1.25 * S * K / E), min_capacity) per sequence.

  c.data = d = ml_collections.ConfigDict()
  d.source = "stdlib"  # "stdlib" or comma-separated text files / globs.
  # "byte" (259 ids), or a path (local or gs://): a Hugging Face tokenizer.json, a
  # SentencePiece .model, or a directory holding tokenizer.json or tokenizer.model (a HF
  # model directory, or WORKDIR/tokenizer of an earlier run). See moex/data/tokenizer.py.
  d.tokenizer = "byte"
  d.val_fraction = 0.05  # Share of files (chosen by path hash) held out for evaluation.
  d.cache_dir = ""  # Token cache; "" = $MOEX_CACHE_DIR/tokens (default ~/.cache/moex).
  d.seq_len = 256  # Tokens per training sequence L.
  d.batch_size = 16  # Global batch B, in sequences; divisible by the process count.
  d.eval_batches = 8  # Validation batches per evaluation (the same ones every time).
  # Prepared token shards instead of data.source (python -m moex.data.prepare; WORKSPACE.md
  # "Data at scale"): comma-separated directories, local or gs://; "" = off. Documents are
  # packed into rows with segment ids and positions; source, val_fraction and cache_dir are
  # then unused (the split was chosen at preparation).
  d.prepared = ""
  d.mixture_weights = ""  # With several data.prepared: their token shares, e.g. "0.7,0.3".
  # Packed batches only (those carrying segment_ids: several documents per row, padding);
  # batches without them are one causal stream per row and ignore both:
  d.document_mask = True  # Attention stays inside each document (no token sees another).
  d.document_positions = True  # RoPE positions restart at 0 at each document's start.

  c.opt = o = ml_collections.ConfigDict()
  o.learning_rate = 3e-3  # Peak learning rate of AdamW.
  o.warmup_steps = 50  # Linear warmup from 0.
  o.min_lr_ratio = 0.1  # The decay ends at learning_rate * min_lr_ratio.
  o.schedule = "cosine"  # After warmup: "cosine" (decays over all of train.steps) or "wsd"
  # (warmup-stable-decay: the peak held, then a linear decay over the last decay_fraction of
  # train.steps; a larger train.steps changes no step before the old decay starts).
  o.decay_fraction = 0.2  # wsd: share of train.steps spent decaying.
  o.weight_decay = 0.1  # Decoupled weight decay on matrices (not norms).
  o.b1 = 0.9  # Adam beta1.
  o.b2 = 0.95  # Adam beta2.
  o.eps = 1e-8  # Adam epsilon.
  o.grad_clip = 1.0  # Global-norm gradient clipping; 0 disables it.

  c.train = t = ml_collections.ConfigDict()
  t.steps = 600  # Total optimizer steps (the learning-rate schedule's length).
  t.log_every = 25  # Steps between train lines in metrics.jsonl / moe_stats.jsonl.
  t.eval_every = 200  # Steps between evaluations (also at step 0 and the last step).
  t.checkpoint_every = 200  # Steps between checkpoints (also at the last step).
  t.keep_checkpoints = 3  # Checkpoints kept on disk.
  t.async_checkpointing = True  # Write checkpoints in a background thread.
  t.progress_seconds = 10.0  # A progress line at least this often.
  t.grad_accum_steps = 1  # Micro-batches per step (gradients averaged; same result).
  t.init_from = ""  # Fine-tuning: a workdir (local or gs://) whose parameters start this run
  # when its own workdir has no checkpoint yet (a resume ignores it); read from its params/
  # (an imported model) or else its newest checkpoint, cast to model.param_dtype. "" = off.
  t.profile_steps = 0  # Trace this many steps with jax.profiler into WORKDIR/tensorboard
  # (TensorBoard's Profile tab, with tensorboard-plugin-profile; process 0 only). 0 = off.
  t.profile_start = 5  # The first traced step: later than compilation and the first steps.

  # Adapters (LoRA) for fine-tuning: every field starts at its default in moex/config.py
  # LoRAConfig, which documents each one; rank 0 = off (full training). An adapter run is a
  # fine-tune: --config.train.init_from=BASE_WORKDIR --config.lora.rank=16
  # --config.lora.targets=attention,experts (WORKSPACE.md "Adapters").
  c.lora = ml_collections.ConfigDict(dataclasses.asdict(config_lib.LoRAConfig()))

  c.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Mesh axis sizes; one may be -1 = all remaining devices.
  mesh.fsdp = 1
  mesh.expert = 1
  mesh.tensor = 1
  # Logical axis -> mesh axes. The one table that decides every partitioning.
  mesh.rules = (
      ("batch", ("data", "fsdp", "expert")),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("mlp", "tensor"),
      ("expert", "expert"),
      ("expert_mlp", "tensor"),
  )
  return c
