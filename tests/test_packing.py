"""Sequence packing (config.packing): several examples a row, each as if it ran alone.

A packed row holds examples in runs of one segment id (1, 2, ...; 0 padding). Each example's
logits and every parameter's gradient must equal those of the same examples run one to a
padded row, on global layers, local layers in the band's blocks and as one masked attention,
with [CLS] and mean pooling.
"""

import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import save_file

from conftest import run_cli
from flaxbert_cls.data import packing
from flaxbert_cls.data import tokenization
from flaxbert_cls.errors import UserError
from flaxbert_cls.model import bert as model_lib
from flaxbert_cls.model import hf
from flaxbert_cls.model import attention as attention_lib
from flaxbert_cls.model import splash
from flaxbert_cls.training import step as step_lib
from model_fixtures import DEMO_DATA, REPO, minilm_dir
from numerics import assert_close

LENGTHS = (40, 23, 5, 17, 9, 30)
ROWS = ((0, 1), (2, 3, 4, 5))  # 63 and 61 tokens
SLOTS = 4  # examples a row at most


def _model(pooling: str, **overrides):
  values = dict(vocab_size=120, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                num_hidden_layers=4, global_attn_every_n_layers=3, local_attention=16,
                max_position_embeddings=128, pad_token_id=0, num_labels=3,
                classifier_pooling=pooling)
  values.update(overrides)
  cfg = hf.model_config(transformers.ModernBertConfig(**values))
  model = model_lib.BertForSequenceClassification(cfg, 3)
  dummy = np.ones((1, 8), np.int32)
  params = nn.unbox(model.init(jax.random.key(0), dummy, dummy))["params"]
  # Non-zero head and norm parameters, so every gradient below is a real one.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  return model, params


def _examples():
  rng = np.random.default_rng(0)
  return [rng.integers(3, 120, size=n).astype(np.int32) for n in LENGTHS]


def _unpacked(examples):
  length = max(LENGTHS)
  ids = np.zeros((len(examples), length), np.int32)
  for i, e in enumerate(examples):
    ids[i, :len(e)] = e
  return ids, (ids > 0).astype(np.int32)


def _packed(examples, length):
  ids = np.zeros((len(ROWS), length), np.int32)
  segments = np.zeros_like(ids)
  slot_of = {}
  for r, row in enumerate(ROWS):
    start = 0
    for s, e in enumerate(row):
      ids[r, start:start + LENGTHS[e]] = examples[e]
      segments[r, start:start + LENGTHS[e]] = s + 1
      slot_of[e] = r * SLOTS + s
      start += LENGTHS[e]
  order = [slot_of[e] for e in range(len(examples))]
  return ids, segments, order


def test_segment_positions_count_from_each_examples_first_token():
  segments = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(attention_lib.segment_positions(segments),
                                [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])


@pytest.mark.parametrize("local_window", [None, 20])
def test_splash_takes_packed_rows_as_its_own_segment_ids(local_window):
  """The TPU kernel (interpret mode here) on packed rows equals XLA's packed attention."""
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 128, 2, 16)), jnp.float32) for _ in range(3))
  segments = np.zeros((2, 128), np.int32)
  segments[0, :50], segments[0, 50:90], segments[0, 90:127] = 1, 2, 3
  segments[1, :128] = np.repeat([1, 2], [100, 28])
  real = segments > 0
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  xla = lambda *a: attention_lib.attention(*a, "xla", local_window=local_window,
                                           segment_ids=segments)
  kernel = lambda *a: splash.attention(*a, interpret=True, local_window=local_window,
                                       segment_ids=segments)
  lengths = jnp.asarray(real.sum(1), jnp.int32)
  assert_close(np.asarray(kernel(q, k, v, lengths))[real],
               np.asarray(xla(q, k, v, lengths))[real], 1e-5)
  loss = lambda fn, *a: jnp.sum(jnp.where(real[:, :, None, None], fn(*a) * weights, 0.0))
  for name, got, want in zip("qkv", jax.grad(loss, argnums=(1, 2, 3))(kernel, q, k, v, lengths),
                             jax.grad(loss, argnums=(1, 2, 3))(xla, q, k, v, lengths)):
    assert_close(got, want, 1e-5, f"d{name}")


# Rows of 64 tokens run the local layers (+-8) in the band's blocks, rows of 32 can't hold
# row 0: rows of 64 with local_attention 64 (+-32) take the one masked attention instead.
@pytest.mark.parametrize("pooling,local_attention", [("cls", 16), ("mean", 16), ("mean", 64)])
def test_packed_rows_give_each_example_its_own_logits_and_gradients(pooling, local_attention):
  model, params = _model(pooling, local_attention=local_attention)
  assert (64 > attention_lib.BANDED_MIN_WINDOWS * local_attention // 2) == (local_attention == 16)
  examples = _examples()
  ids, mask = _unpacked(examples)
  packed_ids, segments, order = _packed(examples, 64)
  weights = np.linspace(0.5, 2.0, len(examples) * 3).reshape(-1, 3).astype(np.float32)

  def alone(p):
    logits = model.apply({"params": p}, ids, mask)
    return jnp.sum(logits * weights), logits

  def packed(p):
    logits = model.apply({"params": p}, packed_ids, (segments > 0).astype(np.int32),
                         segment_ids=segments, num_segments=SLOTS)
    assert logits.shape == (len(ROWS) * SLOTS, 3)
    logits = logits[np.asarray(order)]
    return jnp.sum(logits * weights), logits

  (_, want), want_grads = jax.value_and_grad(alone, has_aux=True)(params)
  (_, got), grads = jax.value_and_grad(packed, has_aux=True)(params)
  assert_close(got, want, 1e-5, "logits")
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(want_grads)):
    assert_close(g, w, 1e-4, jax.tree_util.keystr(path), floor=scale * 1e-3)


def test_empty_slots_pool_to_zeros_and_non_modernbert_encoders_refuse_packed_rows():
  hidden = jnp.ones((1, 6, 2))
  segments = jnp.asarray([[1, 1, 2, 0, 0, 0]])
  pooled = model_lib.segment_pool(hidden, segments, 3, mean=True)
  np.testing.assert_array_equal(pooled, [[1, 1], [1, 1], [0, 0]])
  model, params = _model("mean")
  bert = dataclasses.replace(model.config, encoder="bert", classifier_head="bert")
  with pytest.raises(ValueError, match="ModernBERT"):
    model_lib.BertForSequenceClassification(bert, 3).apply(
        {"params": params}, np.ones((1, 8), np.int32), np.ones((1, 8), np.int32),
        segment_ids=np.ones((1, 8), np.int32), num_segments=1)


# --- Packed batches: which examples share a row, as a pure function of (seed, step) ----------


def test_packed_order_is_pure_in_seed_and_step_and_fills_rows_within_their_bounds():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 70, size=500)
  lengths[:5] = 200  # over the row: truncated, alone in a row
  order = packing.PackedOrder(lengths, batch_size=8, seed=3, capacity=128, max_examples=6)
  again = packing.PackedOrder(lengths, batch_size=8, seed=3, capacity=128, max_examples=6)
  steps = order.steps_per_epoch
  epoch = np.concatenate([order.batch_indices(s) for s in range(steps)])
  np.testing.assert_array_equal(again.batch_indices(steps - 1), epoch[-8:])
  assert epoch.shape == (steps * 8, 6)
  used = epoch[epoch >= 0]
  assert len(np.unique(used)) == len(used)  # each example at most once an epoch
  assert len(used) > 0.9 * len(lengths)  # only the last partial batch's rows wait
  tokens = np.where(epoch >= 0, np.minimum(lengths[np.maximum(epoch, 0)], 128), 0).sum(1)
  assert tokens.max() <= 128 and tokens.mean() > 0.9 * 128
  filled = (epoch >= 0).sum(1)
  assert filled.max() <= 6 and np.all(np.diff((epoch >= 0).astype(int), axis=1) <= 0)
  assert not np.array_equal(order.batch_indices(steps), epoch[:8])  # the next epoch: new rows
  with pytest.raises(UserError, match="batch_size counts rows"):
    packing.PackedOrder(lengths[:10], batch_size=8, seed=0, capacity=128, max_examples=6)


def test_pad_packed_lays_examples_out_in_slot_order_with_their_labels():
  texts = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 30)]
  split = tokenization.TokenizedSplit(
      np.concatenate(texts).astype(np.int32), np.zeros(18, np.int8),
      np.cumsum([0] + [len(t) for t in texts]), np.array([2, 0, 1], np.int32))
  batch = packing.pad_packed(split, np.array([[1, 0, -1], [2, -1, -1]]), 8)
  np.testing.assert_array_equal(batch["input_ids"],
                                [[10, 11, 12, 1, 2, 3, 4, 5], list(range(20, 28))])
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 2, 2, 2], [1] * 8])
  np.testing.assert_array_equal(batch["attention_mask"], batch["segment_ids"] > 0)
  np.testing.assert_array_equal(batch["weights"], [[1, 1, 0], [1, 0, 0]])
  np.testing.assert_array_equal(batch["labels"], [[0, 2, 0], [1, 0, 0]])


def _modernbert_checkpoint(directory) -> str:
  """A tiny random ModernBERT on the MiniLM's vocabulary and tokenizer, saved as HF saves it."""
  config = transformers.ModernBertConfig(
      vocab_size=30522, hidden_size=32, num_attention_heads=2, intermediate_size=48,
      num_hidden_layers=3, global_attn_every_n_layers=3, local_attention=16,
      max_position_embeddings=128, pad_token_id=0, cls_token_id=101, sep_token_id=102,
      bos_token_id=101, eos_token_id=102, num_labels=2, classifier_pooling="mean")
  config.save_pretrained(directory)
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(os.path.join(minilm_dir(), name), directory)
  model = model_lib.BertForSequenceClassification(hf.model_config(config), 2)
  dummy = np.ones((1, 8), np.int32)
  params = nn.unbox(model.init(jax.random.key(0), dummy, dummy))["params"]
  save_file(hf.state_dict_from_params(jax.tree.map(np.asarray, params), "modernbert"),
            os.path.join(directory, hf.SAFETENSORS_NAME))
  return str(directory)


def test_a_packed_modernbert_fine_tunes_through_the_cli_and_bert_is_refused(tmp_path, caplog):
  directory = _modernbert_checkpoint(tmp_path / "ckpt")
  workdir = str(tmp_path / "run")
  args = [f"--config.{k}={v}" for k, v in (
      ("model_name_or_path", directory), ("train_file", os.path.join(DEMO_DATA, "train.tsv")),
      ("validation_file", os.path.join(DEMO_DATA, "dev.tsv")), ("pooling", "mean"),
      ("packing", True), ("packing_max_examples", 8), ("num_train_steps", 12),
      ("learning_rate", 3e-4), ("max_seq_length", 128), ("batch_size", 8), ("baseline", "none"),
      ("log_every_steps", 1))]
  caplog.set_level("INFO", logger="flaxbert_cls")
  code, _, err = run_cli("train", f"--config={REPO}/configs/default.py", f"--workdir={workdir}",
                         *args)
  assert code == 0, err[-2000:]
  assert "of 8 packed rows of 128 tokens" in caplog.text
  records = [json.loads(line) for line in open(os.path.join(workdir, "train_log.jsonl"))]
  losses = [r["loss"] for r in records]
  assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert metrics and "accuracy" in metrics[-1]
  code, _, err = run_cli("train", f"--config={REPO}/configs/default.py",
                         f"--workdir={tmp_path / 'bert'}", *args[1:],
                         f"--config.model_name_or_path={minilm_dir()}")
  assert code == 2 and "config.packing=True: packed rows run on ModernBERT" in err, err[-500:]


def test_train_metrics_average_over_real_examples_only():
  """A packed batch's empty slots (weight 0) count in neither the loss, the accuracy nor the
  examples the train log's examples/s is made of."""
  metrics = step_lib.TrainMetrics.single_from_model_output(
      loss=np.array([1.0, 3.0, 100.0, 100.0], np.float32),
      accuracy=np.array([1.0, 0.0, 1.0, 1.0], np.float32),
      real=np.array([True, True, False, False]), grad_norm=np.float32(1.0),
      param_norm=np.float32(1.0), learning_rate=np.float32(1e-4))
  summary = metrics.compute()
  assert float(summary["loss"]) == 2.0 and float(summary["accuracy"]) == 0.5
  assert int(metrics.loss.count) == 2
