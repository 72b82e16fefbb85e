"""Multi-host start-up: join JAX's distributed runtime from flags, environment, TPU or SLURM.

Every process runs the same `python -m moex.main ...` command. Sources, first match wins:
1. flags --coordinator_address / --num_processes / --process_id;
2. environment MOEX_COORDINATOR_ADDRESS / MOEX_NUM_PROCESSES / MOEX_PROCESS_ID
   (launch/local.sh sets these);
3. a multi-host TPU VM slice (TPU_WORKER_HOSTNAMES lists several workers) or a SLURM job
   with several tasks (SLURM_NTASKS > 1): `jax.distributed.initialize()` with no arguments,
   which reads the cluster itself;
4. otherwise a single process.

A process that dies breaks the others' next collective (gloo sees the closed connection) and
`exiting_on_failure` ends them at once with one line; a process that hangs is noticed through
the coordination service's heartbeat, which aborts the others after `heartbeat_timeout_seconds`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator

import jax
from absl import logging


def _detected_cluster() -> str | None:
  if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "tpu_vm"
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return "slurm"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_seconds: int = 10,
               initialization_timeout: int = 300) -> None:
  """Joins the distributed runtime when this is one process of several (see module doc)."""
  env = os.environ
  coordinator_address = coordinator_address or env.get("MOEX_COORDINATOR_ADDRESS")
  if num_processes is None and "MOEX_NUM_PROCESSES" in env:
    num_processes = int(env["MOEX_NUM_PROCESSES"])
  if process_id is None and "MOEX_PROCESS_ID" in env:
    process_id = int(env["MOEX_PROCESS_ID"])
  timeouts = dict(heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                  initialization_timeout=initialization_timeout)
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id "
                       "(or MOEX_NUM_PROCESSES / MOEX_PROCESS_ID)")
    logging.info("joining %s as process %d of %d", coordinator_address, process_id,
                 num_processes)
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeouts)
  elif (cluster := _detected_cluster()) is not None:
    logging.info("detected a %s cluster: joining its distributed runtime", cluster)
    jax.distributed.initialize(**timeouts)


# What a collective's or the coordination service's error says when another process is gone.
_PEER_LOST = ("Gloo", "NCCL", "by peer", "heartbeat", "Coordination", "UNAVAILABLE")


@contextlib.contextmanager
def exiting_on_failure() -> Iterator[None]:
  """With several processes, ends this one at once, with one line, on an uncaught error."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 -- any error: the peers must not be left waiting
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
      raise
    lost = any(m in str(e) for m in _PEER_LOST)  # not only JaxRuntimeError: numpy re-raises
    if not lost:  # a bug or I/O error of this process: its traceback is the evidence
      traceback.print_exc()
    what = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    cause = ("a collective failed, so another process has probably died: read its log"
             if lost else "this process failed: see the traceback above")
    print(f"moex: process {jax.process_index()} of {jax.process_count()} stopped: {cause} "
          f"({what}); then re-run the same command to resume from the last checkpoint",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    logging.flush()
    # Not sys.exit: at exit JAX's distributed shutdown waits at a barrier for every process,
    # the dead one too, until the heartbeat timeout, and then aborts with a C++ stack dump.
    os._exit(1)
