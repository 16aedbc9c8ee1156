"""tools/gpu_check.sh --smoke on the CPU (numerics and bench sections), and its JSON layout."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  assert set(bench["batches"]) == {"8"} and bench["batches"]["8"]["ours"]["step_s"] > 0
  if bench["torch"]["status"] == "ok":  # both frameworks at each batch, one ratio per batch
    assert bench["at_8"]["torch_step_over_ours"] == pytest.approx(
        bench["at_8"]["torch"]["step_s"] / bench["at_8"]["ours"]["step_s"])
    assert "speedup vs torch:" in run.stdout
