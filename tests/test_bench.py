"""benchmarks/bench.py run as a user runs it (BERT-Tiny, both frameworks, SST-2 lengths): the
figures it derives from its step times, its FLOP count and its table (no timing asserted)."""

import json
import os
import subprocess
import sys

import pytest

from model_fixtures import REPO

BATCH, SEQ = 8, 32
TINY = dict(hidden=128, layers=2, intermediate=512)  # google/bert_uncased_L-2_H-128_A-2


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, glue_dir):
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  env = dict(os.environ, FLAXBERT_DATA=os.path.dirname(glue_dir))
  env.pop("XLA_FLAGS", None)  # conftest's 8 simulated devices: the bench is for one
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "bench.py"), "--model=bert-tiny",
       f"--batch={BATCH}", f"--seq={SEQ}", "--buckets=16", "--lengths=sst2", "--steps=2",
       "--warmup=1", "--vs-torch", f"--json={out}"],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(out.read_text()), run.stdout


def test_speed_figures_follow_from_the_step_times(bench_run):
  report, _ = bench_run
  ours, torch = report["results"]
  assert ours["framework"].startswith("flaxbert-cls (jax"), ours["framework"]
  assert torch["framework"].startswith("torch"), torch["framework"]
  for r in (ours, torch):
    assert r["step_s"] == r["per_seq"][str(SEQ)]["step_s"] > 0
    assert r["examples_per_s"] == pytest.approx(BATCH / r["step_s"])
    assert r["tokens_per_s"] == pytest.approx(BATCH * SEQ / r["step_s"])
    # MFU over the chip's peak: on a CPU ours measures a float32 matmul, torch has none.
    assert r["mfu"] == (pytest.approx(r["train_flops"] / r["step_s"] / r["peak_flops"])
                        if r.get("peak_flops") else None)
  assert ours["peak_flops_source"] == "measured f32 matmul" and torch["mfu"] is None
  assert ours["speedup_vs_torch"] == pytest.approx(torch["step_s"] / ours["step_s"])
  assert ours["host_memory_vs_torch"] == pytest.approx(
      ours["peak_host_bytes"] / torch["peak_host_bytes"])


def test_train_flops_are_six_n_tokens_plus_attention(bench_run):
  report, _ = bench_run
  h, layers, inter = TINY["hidden"], TINY["layers"], TINY["intermediate"]
  dense = 6 * (layers * (4 * h * h + 2 * h * inter) + h * h) * BATCH * SEQ  # + the pooler
  attention = 12 * layers * BATCH * SEQ ** 2 * h  # QK^T and PV, forward and backward
  assert report["results"][0]["train_flops"] == dense + attention


def test_sst2_epoch_estimates_sum_step_times_over_the_epochs_batches(bench_run):
  report, stdout = bench_run
  ours, torch = report["results"]
  assert set(ours["epoch_s"]) == {"fixed", "buckets", "buckets+grouping"}
  assert set(torch["epoch_s"]) == {"fixed", "dynamic", "dynamic+grouping"}
  batches = 67349 // BATCH  # SST-2 train's full batches, each padded to --seq when fixed
  for r in (ours, torch):
    assert r["epoch_s"]["fixed"] == pytest.approx(batches * r["step_s"], rel=1e-6)
  assert f"SST-2 train epoch (67349 examples, {batches} batches of {BATCH})" in stdout
  assert "speedup vs torch:" in stdout and "framework" in stdout.splitlines()[0]
