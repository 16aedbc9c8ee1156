"""The GPU/TPU path, proven on CPU where a CPU can: attention implementations, bf16 kernels,
wide dropout indices, and a CLI that runs without TensorFlow.

Tolerances are relative to the magnitude of what they compare (tests/numerics.py).
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxbert_cls.training import evaluate
from flaxbert_cls.model import layers
from flaxbert_cls.model import attention as attention_lib
from flaxbert_cls.model import ops
from flaxbert_cls.serving import predict
from flaxbert_cls.training import train
from flaxbert_cls.config import default_config
from model_fixtures import DEMO_DATA, REPO, make_tiny_checkpoint
from numerics import assert_close


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


def test_auto_attention_picks_cudnn_only_where_it_runs():
  assert attention_lib.attention_implementation("", "gpu", "bfloat16", 64) == "cudnn"
  assert attention_lib.attention_implementation("", "gpu", "bfloat16", 32) == "cudnn"  # MiniLM
  assert attention_lib.attention_implementation("", "gpu", "float32", 64) == "xla"  # no fp32 kernel
  # 12: not a multiple of 8
  assert attention_lib.attention_implementation("", "gpu", "bfloat16", 12) == "xla"
  assert attention_lib.attention_implementation("", "gpu", "bfloat16", 192) == "xla"  # > 128
  assert attention_lib.attention_implementation("", "cpu", "bfloat16", 64) == "xla"
  assert attention_lib.attention_implementation("", "tpu", "bfloat16", 64) == "xla"
  # TPU: splash from 512 tokens on, only without attention dropout (the kernel has none)
  assert attention_lib.attention_implementation("", "tpu", "bfloat16", 64, 0.0, 512) == "splash"
  assert attention_lib.attention_implementation("", "tpu", "bfloat16", 64, 0.1, 512) == "xla"
  assert attention_lib.attention_implementation("", "tpu", "bfloat16", 64, 0.0, 128) == "xla"
  assert attention_lib.attention_implementation("", "cpu", "float32", 64, 0.0, 512) == "xla"
  assert attention_lib.attention_implementation("cudnn", "gpu", "bfloat16", 64) == "cudnn"


def test_attention_key_lengths_equal_an_explicit_mask():
  """The arguments cuDNN gets (key lengths) give XLA's masked attention, for full query
  lengths and for the [CLS]-only query of the last layer."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 9, 2, 8)), jnp.float32) for _ in range(3))
  lengths = jnp.asarray([9, 5, 1], jnp.int32)
  mask = (jnp.arange(9)[None, :] < lengths[:, None])[:, None, None, :]
  for queries in (q, q[:, :1]):
    expected = jax.nn.dot_product_attention(queries, k, v, mask=mask, implementation="xla")
    assert_close(attention_lib.attention(queries, k, v, lengths, "xla"), expected, 1e-6)
  attention_mask = (np.arange(9)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
  np.testing.assert_array_equal(attention_lib.key_lengths(attention_mask), lengths)


def test_cudnn_attention_hands_odd_lengths_to_xla():
  """cuDNN refuses odd lengths with a padding mask (H100, jax 0.11.2: 'Unsupported sequence
  length Q 1, KV 16' from the [CLS]-only last layer): those calls go to XLA, on any backend."""
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 9, 2, 8)), jnp.float32) for _ in range(3))
  lengths = jnp.asarray([9, 4], jnp.int32)
  for queries, keys, values in ((q[:, :1], k, v), (q[:, :1], k[:, :8], v[:, :8]), (q, k, v)):
    assert_close(attention_lib.attention(queries, keys, values, lengths, "cudnn"),
                 attention_lib.attention(queries, keys, values, lengths, "xla"), 1e-6)


@pytest.mark.parametrize("attention_impl,attention_dropout,dtype", [
    ("", -1.0, "float32"),  # auto -> XLA; the checkpoint's dropout: explicit training path
    ("xla", 0.0, "float32"),  # no attention dropout: training through the fused kernel
    ("", 0.0, "bfloat16"),
])
def test_every_attention_impl_trains_evaluates_and_predicts(tiny_checkpoint, tmp_path,
                                                            attention_impl, attention_dropout,
                                                            dtype):
  c = default_config()
  c.update(model_name_or_path=tiny_checkpoint, train_file=os.path.join(DEMO_DATA, "train.tsv"),
           validation_file=os.path.join(DEMO_DATA, "dev.tsv"), max_seq_length=32,
           seq_buckets=(32,), batch_size=16, eval_batch_size=64, num_train_steps=3,
           warmup_steps=0, learning_rate=1e-3, log_every_steps=1, dtype=dtype,
           attention_impl=attention_impl, attention_dropout=attention_dropout)
  result = train.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
  assert np.isfinite([loss for _, loss in result["train_log"]]).all()
  rows = [json.loads(line) for line in open(tmp_path / "eval" / "predictions.jsonl")]
  assert result["eval"]["accuracy"] == pytest.approx(
      np.mean([r["prediction"] == r["label"] for r in rows]), abs=1e-12)
  again = evaluate.evaluate_workdir(str(tmp_path))
  assert again["accuracy"] == result["eval"]["accuracy"]
  predictor = predict.Predictor.from_path(str(tmp_path))
  bert = predictor.model.config
  assert bert.attention_impl == "xla"  # auto on CPU
  expected_dropout = 0.1 if attention_dropout < 0 else attention_dropout  # checkpoint: 0.1
  assert bert.attention_probs_dropout_prob == pytest.approx(expected_dropout)
  results = predictor.predict(["a gripping film", "dull and long"])
  assert [sorted(r["probabilities"]) for r in results] == [["0", "1"]] * 2


def _plain_attention(q, k, v, mask, seeds, rate):
  """The float32 composition autodiff differentiates (the reference)."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
  probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
  keep = ops.hash_bits(seeds, probs.shape) >= ops.drop_threshold(rate)
  return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(keep, probs / (1 - rate), 0.0), v)


def test_bf16_kernels_match_float32_autodiff():
  """Every custom VJP in bf16 against jax.grad of a plain float32 reference on the same
  (bf16-representable) inputs. Stated tolerances, relative to each tensor's largest entry:
  attention 2e-2 (bf16 operands and probabilities, float32 accumulation; measured 4-6e-3),
  LayerNorm 1e-2 (computed in float32, bf16 output; measured 1-3e-3), dropout 1.6e-2 (the
  bf16 cotangent and the scaled result each rounded once, <= 2^-8 each; measured 6e-3)."""
  rng = np.random.default_rng(5)
  as_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  q, k, v, w = (as_bf16(rng.normal(size=(2, 24, 4, 32))) for _ in range(4))
  lengths = jnp.asarray([24, 13], jnp.int32)
  mask = (jnp.arange(24)[None, :] < lengths[:, None])[:, None, None, :]
  seeds = jnp.asarray([3, 9], jnp.uint32)
  f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]

  ours = lambda q, k, v: jnp.sum(attention_lib.attention_with_dropout(q, k, v, lengths, seeds, 0.1)
                                 .astype(jnp.float32) * w.astype(jnp.float32))
  plain = lambda q, k, v: jnp.sum(_plain_attention(q, k, v, mask, seeds, 0.1) * f32(w)[0])
  assert_close(attention_lib.attention_with_dropout(q, k, v, lengths, seeds, 0.1),
               _plain_attention(*f32(q, k, v), mask, seeds, 0.1), 2e-2, "attention output")
  for name, a, b in zip("qkv", jax.grad(ours, (0, 1, 2))(q, k, v),
                        jax.grad(plain, (0, 1, 2))(*f32(q, k, v))):
    assert a.dtype == jnp.bfloat16
    assert_close(a, b, 2e-2, f"attention d{name}")

  x = as_bf16(rng.normal(size=(4, 16, 64)) * 3 + 1)
  g = jnp.asarray(rng.normal(size=(4, 16, 64)), jnp.float32)
  norm = layers.LayerNorm(1e-12, jnp.bfloat16)
  params = nn.unbox(norm.init(jax.random.key(0), x))
  def plain_ln(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + 1e-12
                                      ) * scale + bias
  p = jax.tree.map(lambda t: t + 0.5, params)["params"]  # scale 1.5, bias 0.5
  ours_ln = lambda x, p: jnp.sum(norm.apply({"params": p}, x).astype(jnp.float32) * g)
  plain_l = lambda x, p: jnp.sum(plain_ln(x, p["scale"], p["bias"]) * g)
  for name, a, b in zip(("dx", "dparams"), jax.grad(ours_ln, (0, 1))(x, p),
                        jax.grad(plain_l, (0, 1))(x.astype(jnp.float32), p)):
    for path, leaf_a in jax.tree_util.tree_leaves_with_path(a):
      leaf_b = dict(jax.tree_util.tree_leaves_with_path(b))[path] if path else b
      assert_close(leaf_a, leaf_b, 1e-2, f"LayerNorm {name}{jax.tree_util.keystr(path)}")

  ours_drop = lambda x: jnp.sum(ops.hash_dropout(x, seeds, 0.1).astype(jnp.float32) * g)
  keep = np.asarray(ops.hash_bits(seeds, x.shape) >= ops.drop_threshold(0.1))
  assert_close(jax.grad(ours_drop)(x), np.where(keep, np.asarray(g) / 0.9, 0.0), 1.6e-2,
               "dropout dx")


def test_bf16_dropout_scale_is_rounded_once_from_float32():
  ones = jnp.ones((4, 256), jnp.bfloat16)
  kept = np.asarray(ops.hash_dropout(ones, jnp.asarray([1, 2], jnp.uint32), 0.1), np.float32)
  values = set(kept[kept != 0].tolist())
  assert values == {float(jnp.asarray(1 / 0.9, jnp.bfloat16))}  # 1.109375, not 1/bf16(0.9)


def _one_word_bits(seeds, shape):
  """The dropout hash before the index was widened: a wrapping 32-bit flat index."""
  index = np.zeros(shape, np.uint64)
  for d, size in enumerate(shape):
    index = index * size + np.indices(shape)[d]
  return ops._mix32(ops._mix32(jnp.asarray(index % 2 ** 32, jnp.uint32) ^ seeds[0]) ^ seeds[1])  # pylint: disable=protected-access


def test_dropout_hash_index_is_unchanged_below_2_32_and_distinct_above():
  seeds = jnp.asarray([12345, 678], jnp.uint32)
  shape = (3, 4, 5, 7)
  np.testing.assert_array_equal(ops.hash_bits(seeds, shape), _one_word_bits(seeds, shape))
  # Attention probabilities [batch, heads, 512, 512] at batch 2^15: 2^33 elements. The
  # [CLS] rows (a first-token-only layer's corner) of example b and b + 2^14 had the same
  # 32-bit index; now they differ, and examples below 2^14 keep their bits.
  full = (2 ** 15, 1, 512, 512)
  bits = np.asarray(ops.hash_bits(seeds, (2 ** 15, 1, 1, 512), full))
  low, high = bits[:2 ** 14], bits[2 ** 14:]
  assert np.mean(low == high) < 1e-3  # independent bits agree with probability 2^-32
  expected_low = _one_word_bits(seeds, (4, 1, 512, 512))[:, :, :1]
  np.testing.assert_array_equal(bits[:4], expected_low)


def test_cli_trains_evaluates_and_predicts_without_tensorflow(tiny_checkpoint, tmp_path):
  """A GPU image with jax but no TensorFlow: any import of it fails, and the run trains,
  writes its TensorBoard scalars (TensorBoard's own writer) and evaluates and predicts."""
  block_tf = ("import sys; sys.modules['tensorflow'] = None; "
              "from flaxbert_cls import cli; sys.argv = ['flaxbert-cls'] + sys.argv[1:]; cli.run()")
  workdir, dev = tmp_path / "run", os.path.join(DEMO_DATA, "dev.tsv")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  run = lambda *args: subprocess.run([sys.executable, "-c", block_tf, *args], env=env, cwd=REPO,
                                     capture_output=True, text=True, timeout=600)
  trained = run("train", f"--config={REPO}/configs/default.py", f"--workdir={workdir}",
                f"--config.model_name_or_path={tiny_checkpoint}", f"--config.train_file={dev}",
                f"--config.validation_file={dev}", "--config.num_train_steps=2",
                "--config.batch_size=8", "--config.max_seq_length=32", "--config.seq_buckets=(32,)")
  assert trained.returncode == 0, trained.stderr[-2000:]
  assert "dev: loss=" in trained.stdout and "no TensorBoard scalars" not in trained.stderr
  events = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")]
  assert len(events) == 1 and os.path.getsize(workdir / events[0]) > 100
  assert (workdir / "metrics.jsonl").is_file()
  evaluated = run("eval", f"--workdir={workdir}")
  assert evaluated.returncode == 0 and "eval: loss=" in evaluated.stdout, evaluated.stderr[-2000:]
  # A new file for a trained run needs no --config: the run's saved config takes the override.
  subset = tmp_path / "dev40.tsv"
  subset.write_text("".join(open(dev).readlines()[:41]))
  on_subset = run("eval", f"--workdir={workdir}", f"--config.validation_file={subset}")
  assert on_subset.returncode == 0, on_subset.stderr[-2000:]
  assert len(open(workdir / "eval" / "predictions.jsonl").readlines()) == 40
  predicted = run("predict", f"--model={workdir}", f"--input={dev}",
                  f"--output={tmp_path / 'out.jsonl'}")
  assert predicted.returncode == 0, predicted.stderr[-2000:]
  assert len(open(tmp_path / "out.jsonl").readlines()) == 872
