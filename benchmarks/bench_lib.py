"""What benchmarks/bench.py's workers share: model sizes, peak FLOP/s, FLOP count, batches, timing."""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from typing import Any, Callable

import numpy as np

import common  # pylint: disable=unused-import  (the repository root on sys.path)

SIZES = {
    # google/bert_uncased_L-2_H-128_A-2 ("BERT-Tiny"): smoke runs of the GPU check.
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=512),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096),
}
# Dense peak FLOP/s per chip (bf16, no sparsity), for MFU on accelerators. Matched
# against jax's device_kind / torch's device name, longest key first.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "A100": 312e12, "H100": 989e12, "H200": 989e12,
}


def peak_flops_for(device_kind: str) -> float | None:
  """The table's peak for a device name ('NVIDIA H100 80GB HBM3', 'TPU v5 lite'), or None."""
  for key in sorted(PEAK_FLOPS, key=len, reverse=True):
    if key.lower() in device_kind.lower():
      return PEAK_FLOPS[key]
  return None


def hf_config_dict(model: str) -> dict[str, Any]:
  """HF config.json fields of a SIZES name, 'minilm' (the packaged one) or a checkpoint dir."""
  if model in SIZES:
    base = dict(vocab_size=30522, hidden_act="gelu", hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1, max_position_embeddings=512,
                type_vocab_size=2, layer_norm_eps=1e-12, model_type="bert")
    return {**base, **SIZES[model]}
  if model == "minilm":
    from flaxbert_cls.model import hf  # pylint: disable=g-import-not-at-top
    model = hf.packaged_minilm_dir()
  with open(os.path.join(model, "config.json")) as f:
    return json.load(f)


def model_config(args) -> dict[str, Any]:
  """hf_config_dict(args.model) with --attention_dropout (>= 0) as training's config sets it."""
  cfg = hf_config_dict(args.model)
  if getattr(args, "attention_dropout", -1.0) >= 0:
    cfg["attention_probs_dropout_prob"] = args.attention_dropout
  return cfg


def train_flops(cfg: dict[str, Any], batch: int, seq: int) -> float:
  """Analytic FLOPs of one train step: 6 * (non-embedding params) * tokens + attention.

  Embedding lookups are not matmuls and are left out; the pooler is counted on
  every token (an upper bound, < 1% of the total). Attention: QK^T and PV, 2 * 2 *
  seq^2 * hidden per layer and example forward, times 3 for forward + backward.
  """
  h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
  per_layer = 4 * h * h + 2 * h * inter  # q, k, v, o + two MLP matmuls
  keys = [seq] * layers
  if cfg.get("model_type") == "modernbert":  # GeGLU's three matrices; local layers' window
    per_layer = 4 * h * h + 3 * h * inter
    band = 2 * (cfg["local_attention"] // 2) + 1
    keys = [seq if i % cfg["global_attn_every_n_layers"] == 0 else min(seq, band)
            for i in range(layers)]
  dense = 6 * (layers * per_layer + h * h) * batch * seq
  attention = 6 * 2 * batch * seq * h * sum(keys)
  return float(dense + attention)


def batch_numpy(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
  """A full-length random batch, the same for both frameworks."""
  rng = np.random.default_rng(0)
  return dict(input_ids=rng.integers(1000, vocab, (batch, seq)).astype(np.int32),
              attention_mask=np.ones((batch, seq), np.int32),
              token_type_ids=np.zeros((batch, seq), np.int32),
              labels=rng.integers(0, 2, batch).astype(np.int32),
              weights=np.ones(batch, np.float32))


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_steps(step: Callable[[], Any], warmup: int, steps: int) -> tuple[float, float]:
  """(first call seconds, median steady-state seconds); `step()` must block."""
  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  for _ in range(warmup - 1):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


def buckets(args) -> tuple[int, ...]:
  """--buckets below --seq, plus --seq."""
  return tuple(sorted({int(b) for b in args.buckets.split(",") if int(b) < args.seq} | {args.seq}))


def seq_list(args, torch_side: bool = False) -> list[int]:
  """Padded lengths to time: --seq, or every bucket (+ torch's interpolation points)."""
  if not args.lengths:
    return [args.seq]
  seqs = set(buckets(args))
  if torch_side:
    seqs |= {s for s in (8, 16, 24, 32, 48, 64, 96) if s < args.seq}
  return sorted(seqs)


def over_deadline(deadline: float | None, last_seconds: float) -> bool:
  """True when one more round like the last (plus half) would end after `deadline`."""
  return deadline is not None and time.time() + 1.5 * last_seconds > deadline


def batch_error(batch: int, error: BaseException) -> dict[str, Any]:
  """A worker's record of a batch size that failed (out of memory, most often)."""
  return dict(batch=batch, error=f"{type(error).__name__}: {str(error)[:800]}")

