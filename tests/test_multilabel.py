"""Multi-label classification, class weights and mean pooling: reading, losses, metrics, a tiny
run end to end, and its export loaded by transformers with the same probabilities."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from flaxbert_cls.training import runs
from flaxbert_cls.model import losses as losses_lib
from flaxbert_cls.data import class_weights
from flaxbert_cls.training import evaluate
from flaxbert_cls.serving import export
from flaxbert_cls.decisions import metrics
from flaxbert_cls.model import bert as model_lib
from flaxbert_cls.data import readers
from flaxbert_cls.data import tasks
from flaxbert_cls.training import train
from flaxbert_cls.config import default_config
from flaxbert_cls.errors import UserError
import export_fixtures
from model_fixtures import DEMO_DATA
from numerics import assert_close

NAMES = ("joy", "anger", "long")


def _task(**overrides):
  c = default_config()
  c.task_name = "custom"
  c.problem_type = "multi_label_classification"
  c.update(overrides)
  return tasks.get_task(c)


def _write(path, text):
  path.write_text(text)
  return str(path)


def test_reads_jsonl_lists_and_delimited_ids(tmp_path):
  jsonl = _write(tmp_path / "a.jsonl", '{"sentence": "a", "label": ["joy", "long"]}\n'
                 '{"sentence": "b", "label": []}\n{"sentence": "c", "label": ["anger"]}\n')
  task = _task()
  names = readers.build_label_names(jsonl, task)
  assert names == ("anger", "joy", "long")  # from the data, sorted
  examples = readers.read_file(jsonl, task, names)
  np.testing.assert_array_equal(examples.labels, [[0, 1, 1], [0, 0, 0], [1, 0, 0]])
  assert examples.labels.dtype == np.float32
  # GoEmotions' layout: no header, ids joined by ',' indexing a label file's lines.
  names_file = _write(tmp_path / "emotions.txt", "joy\nanger\nlong\n")
  tsv = _write(tmp_path / "b.tsv", "x y\t0,2\tid1\nz\t1\tid2\nw\t\tid3\n")
  task = _task(file_columns=("text", "labels", "id"), text_columns=("text",),
               label_column="labels", label_names_file=names_file)
  assert task.label_names == NAMES and task.main_metric == "f1_macro"
  examples = readers.read_file(tsv, task)
  np.testing.assert_array_equal(examples.labels, [[1, 0, 1], [0, 1, 0], [0, 0, 0]])
  # Names work as well as ids, with another delimiter.
  task = _task(label_delimiter="|", label_names=NAMES)
  csv_file = _write(tmp_path / "c.csv", "sentence,label\nhi,joy|long\n")
  np.testing.assert_array_equal(readers.read_file(csv_file, task).labels, [[1, 0, 1]])


def test_bad_labels_get_one_line(tmp_path):
  task = _task(label_names=NAMES)
  unknown = _write(tmp_path / "u.jsonl", '{"sentence": "a", "label": ["joy"]}\n'
                   '{"sentence": "b", "label": ["joy", "fear"]}\n')
  with pytest.raises(UserError, match=r"u.jsonl line 2: label 'fear' is not one of") as e:
    readers.read_file(unknown, task)
  assert "\n" not in str(e.value)
  with pytest.raises(UserError, match=r"id 0\.\.2"):  # ids are accepted too: the message says so
    readers.read_file(_write(tmp_path / "i.jsonl", '{"sentence": "a", "label": [3]}\n'), task)
  single = tasks.get_task(_single())
  empty = _write(tmp_path / "e.jsonl", '{"sentence": "a", "label": "x"}\n'
                 '{"sentence": "b", "label": []}\n')
  with pytest.raises(UserError, match=r"e.jsonl line 2: label is a list \[\]; a single-label"):
    readers.read_file(empty, single, ("x", "y"))
  with pytest.raises(UserError, match=r"config.class_weights: 2 weights for 3 labels"):
    class_weights.resolve("1,2", None, NAMES, tasks.MULTI_LABEL)
  with pytest.raises(UserError, match=r"config.class_weights='often'"):
    class_weights.resolve("often", None, NAMES, tasks.SINGLE_LABEL)


def _single():
  c = default_config()
  c.task_name = "custom"
  return c


def test_losses_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (6, 4)).astype(np.float32)
  multi_hot = (rng.random((6, 4)) < 0.3).astype(np.float32)
  pos_weight = np.array([1.0, 2.5, 10.0, 0.5])
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  expected = -(pos_weight * multi_hot * np.log(p) + (1 - multi_hot) * np.log(1 - p)).mean(-1)
  spec = losses_lib.HeadLoss(tasks.MULTI_LABEL, tuple(pos_weight))
  assert_close(losses_lib.example_losses(jnp.asarray(logits), jnp.asarray(multi_hot), spec),
               expected, 1e-5)
  unweighted = -(multi_hot * np.log(p) + (1 - multi_hot) * np.log(1 - p)).mean(-1)
  assert_close(losses_lib.example_losses(logits, multi_hot, losses_lib.HeadLoss(tasks.MULTI_LABEL)),
               unweighted, 1e-5)
  # Weighted softmax cross-entropy: each example's CE times its class's weight.
  ids = rng.integers(0, 4, 6)
  log_softmax = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
  ce = -log_softmax[np.arange(6), ids]
  spec = losses_lib.HeadLoss(tasks.SINGLE_LABEL, tuple(pos_weight))
  assert_close(losses_lib.example_losses(logits, ids, spec), ce * pos_weight[ids], 1e-5)
  assert_close(losses_lib.example_losses(logits, ids, False), ce, 1e-5)  # the old bool form
  correct = losses_lib.example_correct(logits, multi_hot, losses_lib.HeadLoss(tasks.MULTI_LABEL))
  np.testing.assert_array_equal(correct, ((logits > 0) == (multi_hot > 0)).all(-1))


def test_metrics_match_sklearn_and_numpy():
  rng = np.random.default_rng(1)
  y = (rng.random((50, 5)) < 0.3).astype(np.float32)
  p = (rng.random((50, 5)) < 0.3).astype(bool)
  got = metrics.multilabel_metrics(("f1_macro", "f1_micro", "subset_accuracy"), p, y)
  tp, fp, fn = ((p & (y > 0)).sum(0), (p & (y == 0)).sum(0), (~p & (y > 0)).sum(0))
  per_label = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0)
  assert got["f1_macro"] == pytest.approx(per_label.mean())
  assert got["f1_micro"] == pytest.approx(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()))
  assert got["subset_accuracy"] == pytest.approx(((p == (y > 0)).all(1)).mean())
  table = metrics.per_class_metrics(p, y, list("abcde"))
  np.testing.assert_allclose([table[n]["f1"] for n in "abcde"], per_label)
  assert [table[n]["support"] for n in "abcde"] == y.sum(0).astype(int).tolist()
  ids, gold = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
  table = metrics.per_class_metrics(ids, gold, ["x", "y", "z"])
  np.testing.assert_allclose([table[n]["recall"] for n in "xyz"],
                             skm.recall_score(gold, ids, average=None))


def test_auto_class_weights():
  labels = np.array([0] * 6 + [1] * 2 + [2] * 2)
  weights = class_weights.resolve("auto", labels, ("a", "b", "c"), tasks.SINGLE_LABEL)
  np.testing.assert_allclose(weights, [10 / 18, 10 / 6, 10 / 6])
  assert np.mean(np.array(weights)[labels]) == pytest.approx(1.0)  # the loss keeps its scale
  multi_hot = np.zeros((100, 3), np.float32)
  multi_hot[:20, 0] = 1  # 80 / 20 = 4
  multi_hot[:1, 1] = 1  # 99 / 1, clipped to 30
  multi_hot[:, 2] = 1  # never negative: 0, clipped to 1/30
  np.testing.assert_allclose(
      class_weights.resolve("auto", multi_hot, NAMES, tasks.MULTI_LABEL), [4, 30, 1 / 30])
  assert class_weights.resolve("", None, NAMES, tasks.MULTI_LABEL) == ()
  assert class_weights.resolve("1,2,3.5", None, NAMES, tasks.MULTI_LABEL) == (1, 2, 3.5)


def test_mean_pooling_reads_real_tokens_only(tmp_path):
  cfg = model_lib.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=32,
                             max_position_embeddings=32, pooling="mean",
                             hidden_dropout_prob=0.0)
  model = model_lib.BertForSequenceClassification(cfg, 3)
  ids = jnp.array([[5, 6, 7, 0, 0, 0]])
  mask = jnp.array([[1, 1, 1, 0, 0, 0]])
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), ids, mask)["params"])
  assert "pooler" not in params["bert"]  # the mean replaces BERT's pooler
  apply = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))
  logits = apply(params, ids, mask)
  # Padding does not change it (the pads are masked out of attention and the mean).
  shorter = apply(params, ids[:, :3], mask[:, :3])
  assert_close(logits, shorter, 1e-5)
  hidden, _ = jax.jit(model_lib.BertModel(cfg, add_pooling_layer=False).apply)(
      {"params": params["bert"]}, ids[:, :3], mask[:, :3])
  kernel, bias = params["classifier"]["kernel"], params["classifier"]["bias"]
  assert_close(logits, np.asarray(hidden)[:, :3].mean(1) @ np.asarray(kernel) + bias, 1e-5)


def _multilabel_files(tmp_path):
  """DEMO_DATA sentences with labels a rule gives: joy (positive), anger (negative), long."""
  rows = [line.rstrip("\n").split("\t") for line in open(os.path.join(DEMO_DATA, "dev.tsv"))][1:]
  def write(name, part):
    with open(tmp_path / name, "w") as f:
      for sentence, label in part:
        labels = ["joy" if label == "1" else "anger"] + (["long"] if len(sentence) > 120 else [])
        f.write(json.dumps({"sentence": sentence, "label": labels[:1] if len(sentence) < 40
                            else labels}) + "\n")
    return str(tmp_path / name)
  return write("train.jsonl", rows[:256]), write("dev.jsonl", rows[256:320])


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
  """A tiny random BERT trained 6 steps, multi-label with pos_weight 'auto', and exported."""
  root = tmp_path_factory.mktemp("ml")
  train_file, dev_file = _multilabel_files(root)
  config = export_fixtures.tiny_run_config(
      export_fixtures.tiny_bert(str(root / "tiny")), task_name="custom",
      problem_type="multi_label_classification", train_file=train_file,
      validation_file=dev_file, class_weights="auto", num_train_steps=6, learning_rate=3e-3)
  one_device = jax.devices()[:1]
  result = train.train_and_evaluate(config, str(root / "run"), devices=one_device)
  exported = export.export(str(root / "run"), str(root / "exported"))
  return root, result, dev_file, exported


def test_tiny_multilabel_run_trains_evaluates_and_predicts(multilabel_run):
  root, result, _, _ = multilabel_run
  losses = [loss for _, loss in result["train_log"]]
  assert np.isfinite(losses).all()
  assert set(result["eval"]) >= {"loss", "f1_macro", "f1_micro", "subset_accuracy"}
  record = json.loads(open(root / "run" / "metrics.jsonl").readlines()[-1])
  assert set(record["per_class"]) == {"anger", "joy", "long"}
  rows = [json.loads(l) for l in open(root / "run" / "eval" / "predictions.jsonl")]
  assert len(rows) == 64 and isinstance(rows[0]["label"], list)
  assert rows[0]["prediction"] == [n for n, q in rows[0]["probabilities"].items() if q > 0.5]
  from flaxbert_cls.serving import predict  # pylint: disable=g-import-not-at-top
  out = predict.Predictor.from_path(str(root / "run")).predict(["a fine film", "awful"])
  assert set(out[0]["probabilities"]) == {"anger", "joy", "long"}
  assert isinstance(out[0]["label"], list)


def test_multilabel_export_matches_in_pytorch(multilabel_run):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  root, _, dev_file, exported = multilabel_run
  config = json.load(open(os.path.join(exported, "config.json")))
  assert config["problem_type"] == "multi_label_classification"
  assert config["id2label"] == {"0": "anger", "1": "joy", "2": "long"}
  exp, params = runs.load_run(str(root / "run"), devices=jax.devices()[:1])
  examples = readers.read_file(dev_file, exp.task, exp.label_names)
  _, flax_logits = evaluate.evaluate(exp, params, exp.tokenize(examples),
                                     evaluate.jit_eval_step(exp.model))
  model = transformers.AutoModelForSequenceClassification.from_pretrained(exported).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  enc = tokenizer([t[0] for t in examples.texts], padding=True, truncation=True, max_length=64,
                  return_tensors="pt")
  with torch.no_grad():
    out = model(**enc, labels=torch.tensor(examples.labels))
  assert flax_logits.std() > 0.02  # a head that tells inputs apart
  assert_close(torch.sigmoid(out.logits).numpy(), evaluate.sigmoid(flax_logits), 1e-4)
  # transformers picked BCE from problem_type: its loss is the unweighted eval loss.
  y = examples.labels
  bce = np.mean(np.logaddexp(0, flax_logits) - y * flax_logits)
  assert float(out.loss) == pytest.approx(bce, rel=1e-4)

