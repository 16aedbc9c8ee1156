"""tools/gpu_check.sh --smoke on the CPU (numerics and bench sections), and its JSON layout."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import gpu_check  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.slow
def test_smoke_run_writes_passing_json(tmp_path):
  # The CLI section is left out: three CLI processes take ~40 s more on 2 cores.
  out = tmp_path / "gpu_check.json"
  env = dict(os.environ, PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)  # conftest's 8 simulated devices: the check is for one device
  run = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh"), "--smoke",
                        "--sections=numerics,bench", f"--json={out}"],
                       env=env, capture_output=True, text=True, timeout=240, check=False)
  report = json.loads(out.read_text())
  assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-2000:],
                               {k: report.get(k) for k in ("numerics", "bench")})
  assert report["mode"] == "smoke" and report["passed"]
  assert report["environment"]["missing_modules"] == []
  checks = report["numerics"]["checks"]
  assert set(checks) == {"logits", "grads", "grads_leaf", "loss_after_3"}
  assert all(c["passed"] and c["value"] < c["tolerance"] for c in checks.values())
  bench = report["bench"]
  assert bench["jax"]["status"] == "ok" and bench["torch"]["status"] in ("ok", "skipped")
  assert bench["best_batch"] == 8 and bench["at_8"]["ours"]["step_s"] > 0


def test_compare_pairs_frameworks_per_batch(capsys):
  ours = [dict(framework="jax", batch=b, device="gpu:NVIDIA H100 80GB HBM3", peak_flops=989e12,
               peak_host_bytes=1, peak_device_bytes=b * 10,
               per_seq={"128": {"step_s": s, "compile_s": 20.0}})
          for b, s in ((32, 0.05), (128, 0.15), (64, 0.09))]
  ours.append(dict(batch=256, error="XlaRuntimeError: RESOURCE_EXHAUSTED"))
  theirs = [dict(framework="torch", batch=b, device="cuda:NVIDIA H100 80GB HBM3",
                 peak_flops=989e12, peak_host_bytes=1, peak_device_bytes=b * 12,
                 per_seq={"128": {"step_s": s, "compile_s": 1.0}})
            for b, s in ((32, 0.06), (128, 0.2))]
  out = gpu_check.compare(gpu_check.MODES["gpu"], ours, theirs)
  assert out["best_batch"] == 128 and out["card"].endswith("H100 80GB HBM3")
  assert out["at_32"]["torch_step_over_ours"] == pytest.approx(1.2)
  assert 0 < out["at_32"]["ours"]["mfu"] < 1
  assert out["batches"]["64"]["ours"]["peak_device_bytes"] is None  # after 128: not its own
  assert "torch" not in out["batches"]["64"] and "error" in out["batches"]["256"]["ours"]
  assert "speedup vs torch: 1.20x" in capsys.readouterr().out


def test_sentences_are_sst2_shaped(tmp_path):
  path = gpu_check.write_sentences(str(tmp_path / "train.tsv"), 20, 0)
  lines = open(path).read().splitlines()
  assert lines[0] == "sentence\tlabel" and len(lines) == 21
  assert {line.split("\t")[1] for line in lines[1:]} == {"0", "1"}
