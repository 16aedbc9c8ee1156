"""long_document: head_tail and windows layouts, window pooling, and the loss on documents."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxbert_cls.training import starts
from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.training import evaluate
from flaxbert_cls.training import experiment
from flaxbert_cls.model import hf
from flaxbert_cls.model import long_documents
from flaxbert_cls.serving import export as export_lib
from flaxbert_cls.serving import predict
from flaxbert_cls.data import tokenization
from flaxbert_cls.training import train
from flaxbert_cls.config import default_config
from flaxbert_cls.errors import UserError
from model_fixtures import DEMO_DATA, make_tiny_checkpoint, minilm_dir
from numerics import assert_close

MAX_LEN = 32


@pytest.fixture(scope="module")
def tokenizer():
  return hf.load_tokenizer(minilm_dir())


@pytest.fixture(scope="module")
def documents():
  """40 'documents' of 3 to 8 SST-2 sentences (17 to 147 tokens), labelled by the first."""
  lines = open(os.path.join(DEMO_DATA, "train.tsv")).read().splitlines()[1:223]
  sentences = [line.split("\t") for line in lines]
  docs, start = [], 0
  for i in range(40):
    size = 3 + (i * 5) % 6
    part = sentences[start:start + size]
    start += size
    docs.append((" ".join(s for s, _ in part), part[0][1]))
  return docs


def _content(tokenizer, text):
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_windows_are_the_tokenizers_overflowing_windows(tokenizer, documents):
  """Each document's rows are HF's overflowing windows (stride = overlap), cut at max_windows."""
  texts = [(text,) for text, _ in documents]
  for stride, max_windows in ((20, 3), (30, 8), (1, 2)):
    layout = tokenization.Layout("windows", window_stride=stride, max_windows=max_windows)
    split = tokenization.tokenize(tokenizer, texts, None, MAX_LEN, layout)
    assert len(split) == len(texts) and split.documents[-1] == len(split.lengths)
    assert split.window_counts.max() > 1
    for d, (text,) in enumerate(texts):
      want = tokenizer(text, max_length=MAX_LEN, truncation=True, return_overflowing_tokens=True,
                       stride=MAX_LEN - 2 - stride)["input_ids"][:max_windows]
      rows = range(split.documents[d], split.documents[d + 1])
      got = [split.input_ids[split.offsets[r]:split.offsets[r + 1]].tolist() for r in rows]
      assert got == want, (stride, d)
    full = [len(_content(tokenizer, t)) for (t,) in texts]
    covered = (max_windows - 1) * stride + MAX_LEN - 2
    assert split.num_truncated == sum(n > covered for n in full)


def test_head_tail_keeps_the_first_and_last_tokens(tokenizer, documents):
  texts = [(text,) for text, _ in documents]
  for head in (-1, 0, 10):
    split = tokenization.tokenize(tokenizer, texts, None, MAX_LEN,
                                  tokenization.Layout("head_tail", head_tokens=head))
    assert split.documents is None and len(split) == len(texts)
    keep = 8 if head == -1 else head  # Sun et al.'s 128/510 of the 30 text tokens
    for i, (text,) in enumerate(texts):
      ids = _content(tokenizer, text)
      if len(ids) > MAX_LEN - 2:
        ids = ids[:keep] + ids[len(ids) - (MAX_LEN - 2 - keep):]
      row = split.input_ids[split.offsets[i]:split.offsets[i + 1]].tolist()
      assert row == [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]
    assert split.num_truncated == sum(len(_content(tokenizer, t)) > MAX_LEN - 2 for (t,) in texts)


def test_pooling_with_masks_equals_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4, 3)).astype(np.float32) * 5
  mask = (rng.random((6, 4)) < 0.6).astype(np.float32)
  mask[0] = [1, 0, 0, 0]
  mask[1] = 0  # a padding document: zeros, not NaN
  for pooling in ("mean", "max"):
    got = np.asarray(long_documents.pool_windows(jnp.asarray(logits), jnp.asarray(mask), pooling))
    for d in range(6):
      chosen = logits[d][mask[d] > 0]
      want = (np.zeros(3) if not len(chosen) else
              chosen.mean(0) if pooling == "mean" else chosen.max(0))
      assert_close(got[d], want, 1e-6, f"{pooling} doc {d}", floor=1.0)


def _write_jsonl(path, docs):
  with open(path, "w") as f:
    for text, label in docs:
      f.write(json.dumps({"text": text, "label": label}) + "\n")
  return str(path)


def _config(checkpoint, train_file, dev_file, **overrides):
  c = default_config()
  c.update(model_name_or_path=checkpoint, task_name="custom", train_file=train_file,
           validation_file=dev_file, text_columns=("text",), max_seq_length=MAX_LEN,
           seq_buckets=(MAX_LEN,), batch_size=8, eval_batch_size=8, learning_rate=1e-3,
           num_train_steps=3, warmup_steps=1, log_every_steps=1, long_document="windows",
           window_stride=24, max_windows=3, window_pooling="max", checkpoint_every_steps=2,
           max_checkpoints_to_keep=3, keep_best_checkpoints=0)
  c.update(overrides)
  return c


def _manual_document_logits(exp, params, split, pooling):
  """Every window as its own row of one batch, pooled per document in NumPy: the reference."""
  rows = data_lib.pad_rows(dataclasses.replace(split, labels=None, documents=None),
                           np.arange(len(split.lengths)), MAX_LEN)
  logits = np.asarray(jax.jit(exp.model.apply)({"params": params}, rows["input_ids"],
                                               rows["attention_mask"], rows["token_type_ids"]))
  pool = np.mean if pooling == "mean" else np.max
  return np.stack([pool(logits[a:b], 0) for a, b in zip(split.documents[:-1], split.documents[1:])])


def _cross_entropy(logits, labels):
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return -np.mean(log_probs[np.arange(len(labels)), labels])


def test_windows_train_on_document_logits_and_eval_predict_per_document(documents, tmp_path):
  # No dropout: the first step's loss is then a deterministic function of the parameters.
  checkpoint = make_tiny_checkpoint(str(tmp_path / "tiny"), hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
  train_file = _write_jsonl(tmp_path / "train.jsonl", documents[:32])
  dev_docs = documents[32:] + documents[:5]  # 13: the last eval batch is padded
  config = _config(checkpoint, train_file, _write_jsonl(tmp_path / "dev.jsonl", dev_docs))
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(config, workdir)  # 8 simulated devices
  losses = [loss for _, loss in result["train_log"]]
  assert len(losses) == 3 and np.all(np.isfinite(losses))

  # Step 1's loss is the cross-entropy of step 1's documents' max-pooled logits.
  exp = experiment.build_experiment(config)
  split = experiment.read_tokenized(exp, "train")[0]
  assert len(split) == 32 and split.window_counts.min() == 1 and split.num_truncated > 0
  assert split.window_counts.max() == 3
  initial = starts.create_train_state(exp, 3, checkpoint)[0].params
  order = data_lib.TrainOrder(split.document_lengths, 8, config.seed)
  docs = order.batch_indices(0)
  want = _cross_entropy(_manual_document_logits(exp, jax.device_get(initial), split,
                                                "max")[docs], split.labels[docs])
  assert_close(losses[0], want, 1e-5, "step 1 loss")
  batch = data_lib.train_batch([split], data_lib.TaskMixture([order], np.ones(1), 0), 0,
                               config.seq_buckets, MAX_LEN)
  assert batch["input_ids"].shape[:2] == batch["window_mask"].shape
  assert batch["input_ids"].shape[0] == 8

  # Eval (sharded, in training) and predict: one row per document, in input order.
  params = jax.device_get(result["state"].params)  # the evaluated step's: eval ran at the end
  dev_split = experiment.read_tokenized(exp, "validation")[0]
  probs = evaluate.softmax(_manual_document_logits(exp, params, dev_split, "max"))
  rows = [json.loads(line) for line in open(os.path.join(workdir, "eval", "predictions.jsonl"))]
  assert [r["text"] for r in rows] == [text for text, _ in dev_docs]
  eval_probs = np.array([[r["probabilities"][n] for n in exp.label_names] for r in rows])
  assert_close(eval_probs, probs, 1e-5, "eval")
  assert result["eval"]["accuracy"] == pytest.approx(
      np.mean(probs.argmax(-1) == dev_split.labels), abs=1e-12)
  results = predict.Predictor.from_path(workdir).predict([text for text, _ in dev_docs])
  predicted = np.array([[r["probabilities"][n] for n in exp.label_names] for r in results])
  assert_close(predicted, probs, 1e-5, "predict")

  # Resume from step 2 retrains step 3 bit for bit: window batches are pure in (seed, step).
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  resumed = train.train_and_evaluate(config, workdir)
  for x, y in zip(jax.tree.leaves(resumed["state"].params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), y)


def test_window_attention_starts_as_the_mean_and_learns_which_windows_to_read(documents,
                                                                               tmp_path):
  checkpoint = make_tiny_checkpoint(str(tmp_path / "tiny"), hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
  train_file = _write_jsonl(tmp_path / "train.jsonl", documents[:32])
  dev_docs = documents[32:] + documents[:5]
  config = _config(checkpoint, train_file, _write_jsonl(tmp_path / "dev.jsonl", dev_docs),
                   window_pooling="attention", learning_rate=1e-2)
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(config, workdir)
  losses = [loss for _, loss in result["train_log"]]

  # The score starts at zero: equal weights; the bert head is linear after the pooler, so
  # step 1's loss is that of the mean of the windows' logits.
  exp = experiment.build_experiment(config)
  split = experiment.read_tokenized(exp, "train")[0]
  initial = jax.device_get(starts.create_train_state(exp, 3, checkpoint)[0].params)
  assert not np.any(initial["window_attention"]["kernel"])
  docs = data_lib.TrainOrder(split.document_lengths, 8, config.seed).batch_indices(0)
  plain = dataclasses.replace(exp, model=exp.model.clone(config=dataclasses.replace(
      exp.model.config, window_attention=False)))
  want = _cross_entropy(_manual_document_logits(plain, {k: v for k, v in initial.items()
                                                        if k != "window_attention"}, split,
                                                "mean")[docs], split.labels[docs])
  assert_close(losses[0], want, 1e-5, "step 1 loss")

  # Trained: the scores moved, and a document's logits are its own windows' alone (padding
  # windows and other documents in the batch change nothing); eval and predict agree.
  params = jax.device_get(result["state"].params)
  assert np.any(params["window_attention"]["kernel"])
  dev_split = experiment.read_tokenized(exp, "validation")[0]
  rows = data_lib.pad_rows(dataclasses.replace(dev_split, labels=None, documents=None),
                           np.arange(len(dev_split.lengths)), MAX_LEN)
  one_by_one = []
  for a, b in zip(dev_split.documents[:-1], dev_split.documents[1:]):
    batch = {k: rows[k][None, a:b] for k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["window_mask"] = np.ones((1, b - a), np.int32)
    one_by_one.append(np.asarray(long_documents.document_logits(exp.model, params, batch,
                                                                "attention"))[0])
  probs = evaluate.softmax(np.stack(one_by_one))
  eval_rows = [json.loads(line) for line in open(os.path.join(workdir, "eval",
                                                              "predictions.jsonl"))]
  eval_probs = np.array([[r["probabilities"][n] for n in exp.label_names] for r in eval_rows])
  assert_close(eval_probs, probs, 1e-5, "eval")
  results = predict.Predictor.from_path(workdir).predict([text for text, _ in dev_docs])
  predicted = np.array([[r["probabilities"][n] for n in exp.label_names] for r in results])
  assert_close(predicted, probs, 1e-5, "predict")
  with pytest.raises(UserError, match="window_pooling='attention' cannot be exported") as e:
    export_lib.export(workdir, str(tmp_path / "hf"))
  assert "\n" not in str(e.value)


def _windows_of(batch, i):
  """Document i's windows in a window batch, each as its tuple of token ids."""
  return [tuple(ids[mask > 0]) for ids, mask, kept in
          zip(batch["input_ids"][i], batch["attention_mask"][i], batch["window_mask"][i]) if kept]


def test_sampled_windows_are_each_documents_own_drawn_by_seed_and_step(tokenizer, documents):
  layout = tokenization.Layout("windows", window_stride=20, max_windows=4)
  split = tokenization.tokenize(tokenizer, [(t,) for t, _ in documents], None, MAX_LEN, layout)
  split = dataclasses.replace(split, labels=np.arange(len(documents)))  # label = document id
  assert split.window_counts.max() == 4 and split.window_counts.min() == 1
  order = data_lib.TrainOrder(split.document_lengths, 8, seed=0)

  def batch(step, k, seed=0):
    mixture = data_lib.TaskMixture([order], np.ones(1), seed)
    return data_lib.train_batch([split], mixture, step, (MAX_LEN,), MAX_LEN,
                                windows_per_document=k)

  drawn = {}
  for step in range(2 * order.steps_per_epoch):  # two epochs: every document twice
    every, two = batch(step, 0), batch(step, 2)
    np.testing.assert_array_equal(two["labels"], every["labels"])  # the same documents
    np.testing.assert_array_equal(two["weights"], every["weights"])
    assert two["input_ids"].shape[1] <= 2
    for i, doc in enumerate(every["labels"]):
      windows, kept = _windows_of(every, i), _windows_of(two, i)
      assert len(kept) == min(2, split.window_counts[doc])
      positions = [windows.index(w) for w in kept]
      assert positions == sorted(positions)  # in reading order
      drawn.setdefault(int(doc), []).append(tuple(positions))
    again = batch(step, 2)
    for key in two:
      np.testing.assert_array_equal(again[key], two[key])  # pure in (seed, step)
  long_docs = [d for d in drawn if split.window_counts[d] > 2]
  assert long_docs and any(len(set(drawn[d])) > 1 for d in long_docs)  # drawn anew each epoch
  other_seed = batch(0, 2, seed=1)
  assert any(not np.array_equal(other_seed[k], batch(0, 2)[k]) for k in other_seed)


def test_sampled_windows_keep_the_first_window_when_asked(tokenizer, documents):
  layout = tokenization.Layout("windows", window_stride=20, max_windows=4)
  split = tokenization.tokenize(tokenizer, [(t,) for t, _ in documents], None, MAX_LEN, layout)
  docs = np.array([d for d in range(len(documents)) if split.window_counts[d] > 2] + [-1])
  rng = np.random.default_rng(0)
  firsts = set()
  for _ in range(20):
    kept = data_lib.sample_windows(split, docs, 2, rng, keep_first=True)
    assert len(kept[-1]) == 0  # padding keeps none
    for d, rows in zip(docs[:-1], kept[:-1]):
      assert len(rows) == 2 and rows[0] == split.documents[d]  # the first, then one drawn
      assert split.documents[d] < rows[1] < split.documents[d + 1]
      firsts.add(int(rows[1]))
  assert len(firsts) > len(docs) - 1  # the second is drawn, not fixed
  short = np.array([d for d in range(len(documents)) if split.window_counts[d] == 1][:1])
  assert list(data_lib.sample_windows(split, short, 2, rng, keep_first=True)[0]) == [
      split.documents[short[0]]]


def test_sampled_window_training_resumes_bit_exact(documents, tmp_path):
  checkpoint = make_tiny_checkpoint(str(tmp_path / "tiny"))
  train_file = _write_jsonl(tmp_path / "train.jsonl", documents[:32])
  config = _config(checkpoint, train_file, _write_jsonl(tmp_path / "dev.jsonl", documents[32:]),
                   train_windows=2, train_windows_first=True, window_pooling="mean")
  workdir = str(tmp_path / "run")
  straight = train.train_and_evaluate(config, workdir)
  assert np.all(np.isfinite([loss for _, loss in straight["train_log"]]))
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  resumed = train.train_and_evaluate(config, workdir)
  for x, y in zip(jax.tree.leaves(resumed["state"].params),
                  jax.tree.leaves(straight["state"].params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_long_document_settings_are_one_line(tokenizer):
  from flaxbert_cls import config as config_lib
  for overrides, key in ((dict(long_document="windows", window_stride=MAX_LEN), "window_stride"),
                         (dict(long_document="windows", window_stride=0), "window_stride"),
                         (dict(long_document="windows", window_stride=8, max_windows=0), "max_windows"),
                         (dict(long_document="windows", window_stride=8, train_windows=-1),
                          "train_windows"),
                         (dict(long_document="head_tail", head_tokens=MAX_LEN - 2), "head_tokens"),
                         (dict(long_document="chunks"), "long_document"),
                         (dict(long_document="windows", window_stride=8, window_pooling="sum"),
                          "window_pooling")):
    c = default_config()
    c.max_seq_length = MAX_LEN
    c.update(overrides)
    with pytest.raises(UserError, match=rf"^config\.{key}=") as e:
      config_lib.validate(c)
    assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="single-text tasks only"):
    tokenization.tokenize(tokenizer, [("a b", "c d")], None, MAX_LEN,
                          tokenization.Layout("windows", window_stride=8, max_windows=2))
