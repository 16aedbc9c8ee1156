"""benchmarks/bench.py's PyTorch worker: transformers' AutoModelForSequenceClassification
(BertForSequenceClassification, ModernBertForSequenceClassification, ...), AdamW.

Eager mode (no torch.compile), SDPA attention (transformers' default; --torch_attention=eager:
its explicit softmax), bf16 via autocast on CUDA, gradient clipping as ours.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import bench_lib


def run_torch(args) -> dict[str, Any]:
  """args.batch at each padded length (bench_lib.seq_list)."""
  return run_torch_batches(args, [args.batch])[0]


def run_torch_batches(args, batches: Sequence[int], deadline: float | None = None,
                      progress: Callable[[list], None] | None = None) -> list[dict[str, Any]]:
  """One result per batch size, in order, until one fails or the next would pass `deadline`.

  The model and optimizer are made once; peak device memory is each batch size's own.
  `progress(results so far)` after each batch size.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = bench_lib.model_config(args)
  config = transformers.AutoConfig.for_model(**cfg, num_labels=2)  # BERT sizes, ModernBERT...
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  torch.manual_seed(0)
  t0 = time.perf_counter()
  model = transformers.AutoModelForSequenceClassification.from_config(
      config, attn_implementation=args.torch_attention).train().to(device)
  optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, eps=1e-6, weight_decay=0.01)
  setup_s = time.perf_counter() - t0
  autocast = args.dtype == "bfloat16" and cuda
  name = torch.cuda.get_device_name() if cuda else "cpu"
  results, last = [], 0.0
  for batch_size in batches:
    if results and bench_lib.over_deadline(deadline, last):
      break
    start = time.perf_counter()
    if cuda:
      torch.cuda.reset_peak_memory_stats()
    try:
      per_seq = _time_torch(args, model, optimizer, batch_size, device, autocast, cuda)
    except Exception as e:  # pylint: disable=broad-except
      results.append(bench_lib.batch_error(batch_size, e))
      break
    result = dict(framework=f"torch {torch.__version__} eager {args.torch_attention}"
                  + (" bf16 autocast" if autocast else ""), batch=batch_size,
                  per_seq=per_seq, setup_s=setup_s, peak_host_bytes=bench_lib.peak_rss_bytes(),
                  device=f"{device}:{name}", num_devices=1)
    if cuda:
      result["peak_device_bytes"] = torch.cuda.max_memory_allocated()
      result["peak_flops"] = bench_lib.peak_flops_for(name)
      result["peak_flops_source"] = "table (bf16 dense)"
    results.append(result)
    last = time.perf_counter() - start
    if progress:
      progress(results)
  return results


def _time_torch(args, model, optimizer, batch_size, device, autocast, cuda) -> dict[str, dict]:
  import torch  # pylint: disable=g-import-not-at-top
  per_seq = {}
  vocab = model.config.vocab_size
  for seq in bench_lib.seq_list(args, torch_side=True):
    data = {k: torch.from_numpy(v).long().to(device) for k, v in
            bench_lib.batch_numpy(batch_size, seq, vocab).items() if k != "weights"
            and (k != "token_type_ids" or model.config.model_type != "modernbert")}

    def step(data=data):
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = model(**data).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      optimizer.step()
      if cuda:
        torch.cuda.synchronize()
    first, median = bench_lib.time_steps(step, args.warmup, args.steps)
    per_seq[str(seq)] = dict(step_s=median, compile_s=max(first - median, 0.0))
  return per_seq
