"""Peak host memory of importing a Hugging Face checkpoint, against its size.

  python -m moex.bench.convert --dir=/tmp/moex_bench_convert --layers=11

Writes a Mixtral-shaped bfloat16 checkpoint of random weights (vocab 32000, width 1024,
8 experts of width 3584; 11 layers make 2.2 GB) in 1 GB safetensors shards, then runs
`python -m moex.convert --from_hf` on it in a child process and reports the child's peak
resident memory (VmHWM) beside the checkpoint's size, its largest tensor, and the
resident memory of a child that only imports moex and starts JAX (the baseline).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
from absl import flags
from safetensors.numpy import save_file

from moex import cli
from moex.interop import hf


def define_flags() -> None:
  """Flags only when run as a program (cli.run calls it)."""
  flags.DEFINE_string("dir", "/tmp/moex_bench_convert", "Scratch directory.")
  flags.DEFINE_integer("layers", 11, "Decoder layers (11 = 2.2 GB).")
  flags.DEFINE_bool("keep", False, "Keep the checkpoint and the imported workdir.")

V, D, H, J, A, E, F = 32000, 1024, 16, 4, 64, 8, 3584


def hub_tensors(layers: int):
  """(name, shape) of a Mixtral checkpoint in the hub layout."""
  yield "model.embed_tokens.weight", (V, D)
  for n in range(layers):
    p = f"model.layers.{n}."
    yield p + "input_layernorm.weight", (D,)
    yield p + "post_attention_layernorm.weight", (D,)
    yield p + "self_attn.q_proj.weight", (H * A, D)
    yield p + "self_attn.k_proj.weight", (J * A, D)
    yield p + "self_attn.v_proj.weight", (J * A, D)
    yield p + "self_attn.o_proj.weight", (D, H * A)
    yield p + "block_sparse_moe.gate.weight", (E, D)
    for e in range(E):
      m = p + f"block_sparse_moe.experts.{e}."
      yield m + "w1.weight", (F, D)
      yield m + "w3.weight", (F, D)
      yield m + "w2.weight", (D, F)
  yield "model.norm.weight", (D,)
  yield "lm_head.weight", (V, D)


def write_checkpoint(directory: str, layers: int, shard_bytes: int = 1 << 30) -> dict:
  """Random bf16 weights in shards of at most `shard_bytes`; returns size facts."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  shards, current, size, largest, total = [], {}, 0, 0, 0
  def flush():
    nonlocal current, size
    if current:
      shards.append(current)
      name = f"part-{len(shards):05d}.safetensors"
      save_file(current, os.path.join(directory, name), metadata={"format": "pt"})
      current, size = {}, 0
  weight_map = {}
  for name, shape in hub_tensors(layers):
    w = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    if size + w.nbytes > shard_bytes:
      flush()
    current[name] = w
    weight_map[name] = f"part-{len(shards) + 1:05d}.safetensors"
    size += w.nbytes
    total += w.nbytes
    largest = max(largest, w.nbytes)
  flush()
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": V, "hidden_size": D, "num_hidden_layers": layers,
            "num_attention_heads": H, "num_key_value_heads": J, "head_dim": A,
            "intermediate_size": F, "num_local_experts": E, "num_experts_per_tok": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 1e6, "hidden_act": "silu",
            "torch_dtype": "bfloat16", "tie_word_embeddings": False, "sliding_window": None}
  with open(os.path.join(directory, hf.CONFIG), "w") as f:
    json.dump(config, f)
  return {"total_bytes": total, "largest_tensor_bytes": largest,
          "largest_param_bytes": E * D * F * 2, "files": len(shards)}


# Runs the measured code, then prints the process's own high-water resident memory. VmHWM
# belongs to the address space exec made, unlike ru_maxrss, which keeps the forking parent's
# size across exec (a child forked from a 2 GB parent "peaks" at 2 GB before it runs a line).
_WRAPPER = """
import runpy, sys
try:
  {body}
finally:
  hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
  print("VmHWM_KB", hwm, file=sys.stderr, flush=True)
"""


def _peak_rss_of(body: str) -> tuple[float, float]:
  """(peak resident GB, seconds) of a child process running Python `body`."""
  t0 = time.time()
  r = subprocess.run([sys.executable, "-c", _WRAPPER.format(body=body)], capture_output=True,
                     text=True, check=False)
  hwm = [l.split()[1] for l in r.stderr.splitlines() if l.startswith("VmHWM_KB")]
  if r.returncode or not hwm:
    sys.exit(f"bench.convert: {body} failed:\n{r.stderr[-2000:]}")
  return int(hwm[-1]) * 1024 / 1e9, time.time() - t0


def main(argv):
  del argv
  root = flags.FLAGS.dir
  hf_dir, work = os.path.join(root, "hf"), os.path.join(root, "workdir")
  shutil.rmtree(root, ignore_errors=True)
  t0 = time.time()
  facts = write_checkpoint(hf_dir, flags.FLAGS.layers)
  print(f"wrote {facts['total_bytes'] / 1e9:.2f} GB in {facts['files']} files "
        f"({time.time() - t0:.0f}s); largest tensor {facts['largest_tensor_bytes'] / 1e6:.0f} "
        f"MB, largest moex parameter (stacked experts) {facts['largest_param_bytes'] / 1e6:.0f} "
        "MB", flush=True)
  base, _ = _peak_rss_of("import jax, moex.convert; jax.numpy.zeros(1).block_until_ready()")
  argv = ["moex.convert", f"--from_hf={hf_dir}", f"--workdir={work}", "--tokenizer=byte"]
  peak, seconds = _peak_rss_of(f"sys.argv = {argv!r}; "
                               "runpy.run_module('moex.convert', run_name='__main__')")
  size = facts["total_bytes"] / 1e9
  print(f"import: {seconds:.0f}s, peak resident {peak:.2f} GB; baseline (python + jax) "
        f"{base:.2f} GB; peak - baseline = {peak - base:.2f} GB = {(peak - base) / size:.2f} x "
        f"the checkpoint ({size:.2f} GB) = checkpoint + "
        f"{(peak - base - size) * 1e9 / facts['largest_tensor_bytes']:.1f} x its largest tensor",
        flush=True)
  if not flags.FLAGS.keep:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.bench.convert")
