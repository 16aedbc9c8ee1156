"""benchmarks/gpu_check.py's numerics section: bf16 on the accelerator against float32 on the CPU.

A random-init BERT (bench_lib.SIZES) with dropout off, the same float32 initial
parameters on both sides, and the same batches: a learnable rule (each label has
a class marker in about a third of the positions) with random padding, so the loss moves.
Compared:

  logits          max|diff| / max|ref| of the first batch's logits
  grads           ||diff|| / ||ref|| over all gradients of the first batch
  grads_leaf      the worst parameter's ||diff|| / ||ref||, over parameters whose gradient
                  norm is at least 1e-4 of the largest (attention key biases' is 0 exactly:
                  softmax ignores them; what is left there is rounding noise)
  loss_after_N    |diff| / max(ref, 0.1) of the mean loss over the last 5 of N train steps
                  (flaxbert_cls.training.step_lib.train_step: AdamW, clipping, warmup)

The reference is float32 on `jax.devices('cpu')`; the checked side is the first device in
the given dtype (on a CPU-only machine, bf16 against f32 on the CPU: the smoke run).
The two sides run in two threads, so their compiles overlap.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time
from typing import Any

import numpy as np

import bench_lib

# Relative to the reference's magnitude. bf16 keeps 8 significant bits (~0.4% per
# rounding) and a layer stacks a few dozen roundings. Random-init logits are small sums
# that mostly cancel, so their relative error is the largest: bf16 on CPU gave 0.02-0.05
# (4-12 layers), gradients 0.01 (worst parameter 0.08), the loss after 50 steps 0.002.
TOLERANCES = {"logits": 0.1, "grads": 0.05, "grads_leaf": 0.25, "loss_after_N": 0.05}
MARKERS = (2000, 3000)  # label 0's and label 1's marker word


def batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
  """`n` batches: [CLS] words... [SEP] padding; a third of the words are the label's marker."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    labels = rng.integers(0, 2, batch)
    ids = rng.integers(1000, vocab, (batch, seq))
    marked = rng.random((batch, seq)) < 1 / 3
    ids = np.where(marked, np.asarray(MARKERS)[labels][:, None], ids)
    ids[:, 0] = 101
    lengths = rng.integers(seq // 2, seq + 1, batch)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    ids[np.arange(batch), lengths - 1] = 102
    out.append(dict(input_ids=(ids * mask).astype(np.int32), attention_mask=mask,
                    token_type_ids=np.zeros((batch, seq), np.int32),
                    labels=labels.astype(np.int32), weights=np.ones(batch, np.float32)))
  return out


def _side(cfg: dict, params: Any, data: list[dict], device: Any, dtype: str,
          attention_impl: str) -> dict[str, Any]:
  """First-batch logits and gradients, then one train step per batch, on `device`."""
  from flaxbert_cls.model import losses as losses_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import step as step_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import bert as model_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import optimizer as optim  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.config import default_config  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  model = model_lib.BertForSequenceClassification(
      model_lib.BertConfig.from_hf(cfg, dtype=dtype, attention_impl=attention_impl), 2)
  config = default_config()
  config.learning_rate, config.warmup_steps = 1e-4, 5
  tx, schedule = optim.create_optimizer(config, params, len(data))

  def loss_and_logits(p, b):
    logits = model.apply({"params": p}, b["input_ids"], b["attention_mask"],
                         b["token_type_ids"], deterministic=True)
    losses, _ = losses_lib.head_losses(logits, b["labels"], None, False)
    return jnp.sum(losses * b["weights"]) / jnp.sum(b["weights"]), logits

  put = functools.partial(jax.device_put, device=device)
  params = put(params)
  grad_fn = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True))
  (_, logits), grads = grad_fn(params, put(data[0]))
  logits, grads = jax.device_get((logits, grads))
  step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, schedule=schedule,
                                   head_loss=False, dropout_seed=0))
  state = put(state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params)))
  metrics = []
  for b in data:
    state, m, _ = step(state, put(b))
    metrics.append(m)
  losses = [float(m.compute()["loss"]) for m in jax.device_get(metrics)]
  return dict(logits=np.asarray(logits), grads=grads, losses=losses,
              seconds=time.perf_counter() - start,
              device=f"{device.platform}:{getattr(device, 'device_kind', '')}")


def _grad_errors(grads: Any, ref: Any) -> dict[str, Any]:
  """Global relative L2 error; the worst leaf's, over leaves with a gradient that is not ~0."""
  import jax  # pylint: disable=g-import-not-at-top
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ref)[0]]
  diff2 = np.asarray([float(np.sum(np.square(np.asarray(g, np.float64) - r)))
                      for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref))])
  ref2 = np.asarray([float(np.sum(np.square(np.asarray(r, np.float64))))
                     for r in jax.tree.leaves(ref)])
  kept = ref2 > 1e-8 * ref2.max()  # relative norm 1e-4: rounding noise around an exact 0
  per_leaf = np.sqrt(diff2[kept] / ref2[kept])
  worst = int(np.argmax(per_leaf))
  return dict(grads=float(np.sqrt(diff2.sum() / ref2.sum())), grads_leaf=float(per_leaf[worst]),
              parameter=str(np.asarray(paths)[kept][worst]),
              skipped=[p for p, k in zip(paths, kept) if not k])


def check(value: float, tolerance: float) -> dict[str, Any]:
  return dict(value=value, tolerance=tolerance, passed=bool(value <= tolerance))


def run(model: str, batch: int, seq: int, steps: int, dtype: str = "bfloat16",
        attention_impl: str = "") -> dict[str, Any]:
  """The section's JSON: sizes, both sides' devices and timings, one entry per check.

  `attention_impl` '' picks as training does (attention.attention_implementation: cuDNN on a
  GPU in bf16); the float32 CPU reference always uses XLA's. Should the picked kernel
  fail, XLA's is compared instead and the section fails with the error.
  """
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import bert as model_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import attention as attention_lib  # pylint: disable=g-import-not-at-top

  cfg = dict(bench_lib.hf_config_dict(model), hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)  # deterministic: both sides see one function
  data = batches(steps, batch, seq, cfg["vocab_size"])
  cpu = jax.devices("cpu")[0]
  init_model = model_lib.BertForSequenceClassification(model_lib.BertConfig.from_hf(cfg), 2)
  dummy = np.ones((1, 8), np.int32)
  with jax.default_device(cpu):  # one float32 initialisation, copied to both sides
    params = jax.jit(lambda r: init_model.init(r, dummy, dummy, dummy))(jax.random.key(0))
  params = jax.device_get(flax.linen.unbox(params["params"]))
  device = jax.devices()[0]
  attention_impl = attention_lib.attention_implementation(attention_impl, device.platform, dtype,
                                                          init_model.config.head_dim)
  error = None
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    checked = pool.submit(_side, cfg, params, data, device, dtype, attention_impl)
    reference = pool.submit(_side, cfg, params, data, cpu, "float32", "xla")
    try:
      checked = checked.result()
    except Exception as e:  # pylint: disable=broad-except
      if attention_impl == "xla":
        raise
      # Still compare XLA's attention (the reference keeps running), and fail the check.
      error, attention_impl = f"{type(e).__name__}: {str(e)[:1500]}", "xla"
      checked = _side(cfg, params, data, device, dtype, attention_impl)
    reference = reference.result()
  logits_err = float(np.max(np.abs(checked["logits"] - reference["logits"]))
                     / np.max(np.abs(reference["logits"])))
  grads = _grad_errors(checked["grads"], reference["grads"])
  tail = min(5, steps)
  final, final_ref = np.mean(checked["losses"][-tail:]), np.mean(reference["losses"][-tail:])
  checks = {
      "logits": check(logits_err, TOLERANCES["logits"]),
      "grads": check(grads["grads"], TOLERANCES["grads"]),
      "grads_leaf": dict(check(grads["grads_leaf"], TOLERANCES["grads_leaf"]),
                         parameter=grads["parameter"], skipped_exact_zero=len(grads["skipped"])),
      f"loss_after_{steps}": dict(check(float(abs(final - final_ref) / max(final_ref, 0.1)),
                                        TOLERANCES["loss_after_N"]),
                                  loss=float(final), reference_loss=float(final_ref)),
  }
  return dict(
      model=model, batch=batch, seq=seq, steps=steps, dtype=dtype,
      attention_impl=attention_impl, reference="float32 on " + reference["device"],
      device=checked["device"], checks=checks,
      passed=error is None and all(c["passed"] for c in checks.values()),
      **({"auto_attention_error": error} if error else {}),
      losses={"checked": [round(x, 5) for x in checked["losses"]],
              "reference": [round(x, 5) for x in reference["losses"]]},
      side_seconds={"checked": round(checked["seconds"], 1),
                    "reference": round(reference["seconds"], 1)})
