"""launch/*: the TPU VM script's dry run, the SLURM script's syntax, and local.sh stopping
every process when one dies."""

import os
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tpu_vm_dry_run_prints_every_gcloud_command():
  r = subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), "--dry-run", "--name", "s1",
                      "--zone", "us-east5-a", "--type", "v5p-32", "--spot", "--delete", "--",
                      "--config=experiments/tiny.py", "--workdir=gs://bucket/run"],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  gcloud = [l for l in lines if l.startswith("gcloud ")]
  assert gcloud[0].startswith("gcloud compute tpus tpu-vm create s1 --zone us-east5-a "
                              "--accelerator-type v5p-32")
  assert "--spot" in gcloud[0]
  assert any(" scp " in l and "--worker=all" in l for l in gcloud)
  assert any(" ssh " in l and "--worker=all" in l and "moex.main" in l
             and "--workdir=gs://bucket/run" in l for l in gcloud)
  assert gcloud[-1].startswith("gcloud compute tpus tpu-vm delete s1")


def test_tpu_vm_needs_its_arguments():
  r = subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), "--dry-run"],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and "usage" in r.stderr


def test_slurm_script_parses():
  r = subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm.sbatch")],
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


def test_local_sh_stops_everyone_when_one_process_dies(tmp_path):
  # A process that cannot start (a bad flag) exits at once; the other must not hang waiting
  # for it: local.sh stops it and fails.
  script = tmp_path / "fake_main.py"
  script.write_text(
      "import os, sys, time\n"
      "if os.environ['MOEX_PROCESS_ID'] == '1':\n"
      "    sys.exit(3)\n"
      "time.sleep(600)\n")
  fake_pkg = tmp_path / "moex"
  fake_pkg.mkdir()
  (fake_pkg / "__init__.py").write_text("")
  (fake_pkg / "main.py").write_text(script.read_text())
  env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(tmp_path))
  start = time.time()
  r = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "-n", "2", "-d", "1", "--",
                      "--anything"], cwd=tmp_path, env=env, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 3, r.stderr
  last = r.stderr.splitlines()[-1]
  assert last.startswith("local.sh: process 1 (pid ") and "exited with 3; stopped" in last, last
  assert time.time() - start < 60
