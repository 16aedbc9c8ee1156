"""tools/bench.py helpers: FLOP formula, peak table, epoch plans, table output (no timing)."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))

import bench  # pylint: disable=g-import-not-at-top,wrong-import-position
import bench_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
import bench_sst2  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_train_flops_bert_base():
  cfg = bench_lib.hf_config_dict("bert-base")
  # 85M encoder (+ pooler) parameters: 6 * N * tokens, plus attention's 12 * L * B * S^2 * H.
  n = 12 * (4 * 768 ** 2 + 2 * 768 * 3072) + 768 ** 2
  expected = 6 * n * 32 * 128 + 12 * 12 * 32 * 128 ** 2 * 768
  assert bench_lib.train_flops(cfg, 32, 128) == expected
  assert 2.0e12 < expected < 2.3e12


def test_peak_flops_table_matches_device_names():
  assert bench_lib.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
  assert bench_lib.peak_flops_for("NVIDIA A100-SXM4-40GB") == 312e12
  assert bench_lib.peak_flops_for("TPU v5 lite") == 197e12
  assert bench_lib.peak_flops_for("TPU v5p") == 459e12
  assert bench_lib.peak_flops_for("TPU v6 lite") == 918e12
  assert bench_lib.peak_flops_for("cpu") is None


def test_epoch_plans_and_interpolation():
  lengths = np.array([5, 9, 17, 30, 70, 12, 8, 3] * 16)
  plans = bench_sst2.epoch_lengths(lengths, 8, 128, (16, 32, 64, 128), grouping_window=4)
  assert len(plans["fixed"]) == 16 and set(plans["fixed"]) == {128}
  assert set(plans["buckets"]) <= {16, 32, 64, 128}
  assert plans["buckets+grouping"].mean() <= plans["buckets"].mean()
  assert (plans["dynamic"] <= plans["buckets"]).all()
  per_seq = {"32": {"step_s": 1.0}, "64": {"step_s": 2.0}, "128": {"step_s": 5.0}}
  assert bench_sst2.step_time_at(per_seq, 48) == 1.5
  assert bench_sst2.step_time_at(per_seq, 16) == 0.5  # below the smallest: proportional
  est = bench_sst2.epoch_estimates({"per_seq": per_seq}, plans, ("fixed",))
  assert est["fixed"] == 16 * 5.0


def test_summary_and_table():
  class Args:
    model, batch, seq, dtype = "bert-base", 32, 128, "float32"
  results = [dict(framework="ours", per_seq={"128": {"step_s": 2.0, "compile_s": 10.0}},
                  peak_host_bytes=2e9, peak_flops=4e12),
             dict(framework="torch", per_seq={"128": {"step_s": 3.0, "compile_s": 1.0}},
                  peak_host_bytes=3e9)]
  bench.summarize(Args, results)
  assert results[0]["examples_per_s"] == 16.0
  assert results[0]["speedup_vs_torch"] == 1.5
  assert 0 < results[0]["mfu"] < 1 and results[1]["mfu"] is None
  table = bench.format_table(results)
  assert "speedup vs torch: 1.50x" in table and "ours" in table and "torch" in table


def test_data_dir_default_and_override(monkeypatch):
  import common  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("FLAXBERT_DATA", raising=False)
  assert common.data_dir() == os.path.join(os.path.dirname(common.REPO), "shared", "data")
  monkeypatch.setenv("FLAXBERT_DATA", "/elsewhere")
  assert common.data_dir() == "/elsewhere"
  assert common.data_dir("given") == "given"
