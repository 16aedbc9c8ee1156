"""A multi-task run with a single-label and a multi-label head (mean-pooled): one label array
for both in the train step, per-task eval metrics, one export per task with its problem type."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxbert_cls.config import default_config
from flaxbert_cls.model import losses as losses_lib
from flaxbert_cls.serving import export
from flaxbert_cls.serving import predict
from flaxbert_cls.training import batches
from flaxbert_cls.training import runs
from flaxbert_cls.training import train
from model_fixtures import DEMO_DATA, make_tiny_checkpoint
from numerics import assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_head_losses_read_single_and_multi_label_rows_of_one_array():
  """[batch, width] labels: a multi-label head reads its columns, a single-label one column 0."""
  rng = np.random.default_rng(0)
  single, multi = rng.normal(size=(4, 2)), rng.normal(size=(4, 3))
  labels = np.zeros((4, 3), np.float32)
  labels[:2, 0] = [1, 0]  # rows 0-1: single-label task, class ids
  labels[2:] = [[1, 0, 1], [0, 1, 1]]  # rows 2-3: multi-hot
  task_ids = np.array([0, 0, 1, 1])
  specs = (losses_lib.HeadLoss(), losses_lib.HeadLoss("multi_label_classification"))
  got, correct = losses_lib.head_losses((jnp.asarray(single), jnp.asarray(multi)),
                                        jnp.asarray(labels), jnp.asarray(task_ids), specs)
  ce = optax.softmax_cross_entropy_with_integer_labels(single[:2], np.array([1, 0]))
  bce = np.mean(np.logaddexp(0, multi[2:]) - labels[2:] * multi[2:], axis=-1)
  assert_close(got, np.concatenate([ce, bce]), 1e-5)
  assert correct.shape == (4,)


def _files(root):
  """SST-2 rows: sst2 labels, and multi-label tags a rule gives (joy/anger, long)."""
  rows = [line.split("\t") for line in open(os.path.join(DEMO_DATA, "dev.tsv")).read()
          .splitlines()[1:241]]
  def write(name, part):
    path = os.path.join(root, name)
    with open(path, "w") as f:
      for sentence, label in part:
        tags = ["joy" if label == "1" else "anger"] + (["long"] if len(sentence) > 100 else [])
        f.write(json.dumps({"sentence": sentence, "tags": tags}) + "\n")
    return path
  tsv = os.path.join(root, "sst2.tsv")
  with open(tsv, "w") as f:
    f.write("sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in rows[:200]))
  return tsv, write("tags_train.jsonl", rows[:200]), write("tags_dev.jsonl", rows[200:])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("mtml"))
  sst2, tags_train, tags_dev = _files(root)
  c = default_config()
  c.model_name_or_path = make_tiny_checkpoint(os.path.join(root, "tiny"))
  c.tasks = (
      {"task_name": "sst2", "train_file": sst2, "validation_file": sst2},
      {"task_name": "custom", "name": "tags", "train_file": tags_train,
       "validation_file": tags_dev, "text_columns": ("sentence",), "label_column": "tags",
       "problem_type": "multi_label_classification"},
  )
  c.update(mixing="equal", pooling="mean", max_seq_length=32, seq_buckets=(32,), batch_size=8,
           eval_batch_size=40, learning_rate=3e-3, num_train_steps=6, warmup_steps=1,
           log_every_steps=1, checkpoint_every_steps=6)
  workdir = os.path.join(root, "run")
  result = train.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
  return root, workdir, result, tags_dev


def test_train_and_eval_report_each_task(run):
  _, workdir, result, _ = run
  assert np.isfinite([loss for _, loss in result["train_log"]]).all()
  assert {"sst2/accuracy", "tags/f1_macro", "tags/subset_accuracy", "average"} <= set(result["eval"])
  exp, _ = runs.load_run(workdir, devices=jax.devices()[:1])
  assert batches.label_width(exp) == 3 and batches.labels_dtype(exp) == np.float32
  assert [t.task.problem_type for t in exp.tasks] == ["single_label_classification",
                                                     "multi_label_classification"]


def test_each_task_exports_with_its_problem_type_and_predicts_as_the_run(run):
  root, workdir, _, tags_dev = run
  out = export.export(workdir, os.path.join(root, "exported"))
  assert sorted(os.listdir(out)) == ["sst2", "tags"]
  exp, params = runs.load_run(workdir, devices=jax.devices()[:1])
  texts = [json.loads(l)["sentence"] for l in open(tags_dev)]
  for i, name in enumerate(("sst2", "tags")):
    directory = os.path.join(out, name)
    config = json.load(open(os.path.join(directory, "config.json")))
    assert config["problem_type"] == exp.tasks[i].task.problem_type
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        directory, trust_remote_code=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
      torch_logits = model(**enc).logits.numpy()
    # The run's own model on the same rows (the head of task i).
    flax_logits = np.asarray(exp.model.apply(
        {"params": jax.device_get(params)}, enc["input_ids"].numpy(),
        enc["attention_mask"].numpy(), enc["token_type_ids"].numpy())[i])
    assert flax_logits.std() > 0.02
    assert_close(torch_logits, flax_logits, 1e-4)
    predictor = predict.Predictor.from_path(directory)
    got = predictor.predict(texts[:5])
    probs = (torch.sigmoid if name == "tags" else lambda x: x.softmax(-1))(
        torch.tensor(torch_logits[:5])).numpy()
    assert_close(np.array([[r["probabilities"][config["id2label"][str(j)]]
                            for j in range(len(config["id2label"]))] for r in got]), probs, 1e-4)
    if name == "tags":
      assert isinstance(got[0]["label"], list)
