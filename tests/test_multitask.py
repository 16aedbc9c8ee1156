"""Multi-task runs: the task sampler, per-task eval, resume, per-task export, TFDS reading."""

import json
import os

import jax
import numpy as np
import pytest

from flaxbert_cls.training import resume
from flaxbert_cls.training import runs
from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.data import sources as dataset_sources
from flaxbert_cls.training import evaluate
from flaxbert_cls.training import experiment
from flaxbert_cls.serving import export
from flaxbert_cls.data import readers
from flaxbert_cls.data import tasks as tasks_lib
from flaxbert_cls.training import train
from flaxbert_cls.config import default_config
from flaxbert_cls.errors import Preempted, UserError
from model_fixtures import DEMO_DATA, make_tiny_checkpoint

DEV = os.path.join(DEMO_DATA, "dev.tsv")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def small_dev(tmp_path_factory):
  """The first 100 demo dev rows (and 400 train rows, next to it): runs stay cheap."""
  directory = tmp_path_factory.mktemp("data")
  (directory / "dev.tsv").write_text("\n".join(open(DEV).read().splitlines()[:101]) + "\n")
  train_rows = open(os.path.join(DEMO_DATA, "train.tsv")).read().splitlines()[:401]
  (directory / "train.tsv").write_text("\n".join(train_rows) + "\n")
  return str(directory / "dev.tsv")


def two_task_config(checkpoint, dev, **overrides):
  """sst2 (2 classes) + a regression head on the same sentences: both head kinds."""
  c = default_config()
  c.model_name_or_path = checkpoint
  train_file = os.path.join(os.path.dirname(dev), "train.tsv")
  c.cache_dir = os.path.join(os.path.dirname(dev), "cache")  # tokenize once for all runs
  c.tasks = (
      {"task_name": "sst2", "train_file": train_file, "validation_file": dev, "weight": 1.0},
      {"task_name": "custom", "name": "score", "train_file": train_file, "validation_file": dev,
       "text_columns": ("sentence",), "label_column": "label", "is_regression": True,
       "weight": 3.0},
  )
  c.mixing = "equal"
  c.max_seq_length = 32
  c.seq_buckets = (32,)
  c.batch_size = 8
  c.eval_batch_size = 40
  c.learning_rate = 1e-3
  c.num_train_steps = 6
  c.warmup_steps = 1
  c.log_every_steps = 1
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
  c.update(overrides)
  return c


def _mixture(sizes, probabilities, seed=0):
  orders = [data_lib.TrainOrder(np.ones(n, np.int64), 4, seed + i) for i, n in enumerate(sizes)]
  return data_lib.TaskMixture(orders, np.asarray(probabilities), seed)


@pytest.mark.parametrize("mixing,temperature", [("proportional", 1.0), ("temperature", 2.0),
                                                ("equal", 1.0)])
def test_mixing_distribution_over_1000_steps(mixing, temperature):
  sizes, weights = [8000, 1000, 250], [1.0, 1.0, 2.0]
  p = data_lib.mixing_probabilities(sizes, weights, mixing, temperature)
  exponent = {"proportional": 1.0, "temperature": 0.5, "equal": 0.0}[mixing]
  expected = np.array(weights) * np.array(sizes, float) ** exponent
  np.testing.assert_allclose(p, expected / expected.sum())
  mixture = _mixture(sizes, p)
  counts = np.bincount([mixture.task_for_step(s) for s in range(1000)], minlength=3)
  # Binomial standard deviation at 1000 draws is <= 0.016: 4 sigma.
  np.testing.assert_allclose(counts / 1000, p, atol=0.064)


def test_sampler_is_pure_in_seed_and_step():
  p = [0.5, 0.3, 0.2]
  a, b = _mixture([100, 60, 40], p), _mixture([100, 60, 40], p)
  forward = [(t, rows.tolist()) for t, rows in map(a.batch_indices, range(3000))]
  # Any order of queries (a resume at step 2500, then earlier steps) gives the same batches.
  backward = [(t, rows.tolist()) for t, rows in map(b.batch_indices, reversed(range(3000)))]
  assert forward == backward[::-1]
  # A task's k-th draw takes batch k of its own order: no example repeats within its epoch.
  first = [rows for t, rows in forward if t == 1][:15]  # 60 examples / batch 4 = 15 per epoch
  assert sorted(sum(first, [])) == list(range(60))
  other = _mixture([100, 60, 40], p, seed=1)
  assert [other.task_for_step(s) for s in range(100)] != [t for t, _ in forward[:100]]
  single = _mixture([100], [1.0])
  np.testing.assert_array_equal(single.batch_indices(37)[1], single.orders[0].batch_indices(37))


def test_tasks_config_errors_name_the_entry(tiny_checkpoint, small_dev):
  bad = [
      ({"task_name": "sst2", "trian_file": "x.tsv"}, r"config.tasks\[0\]: unknown key 'trian_file'"),
      ({"task_name": "sst2", "weight": 0}, r"config.tasks\[0\].weight=0: must be"),
      ({"task_name": "custom", "train_file": "x.tsv"}, r"config.tasks\[0\]: a custom task needs"),
      ({"task_name": "sts"}, r"config.tasks\[0\] \(sts\): config.task_name: unknown task"),
  ]
  for entry, message in bad:
    with pytest.raises(UserError, match=message):
      experiment.build_experiment(two_task_config(tiny_checkpoint, small_dev, tasks=(entry,)),
                             devices=jax.devices()[:1])
  with pytest.raises(UserError, match="config.selection_metric='cola'"):
    experiment.build_experiment(two_task_config(tiny_checkpoint, small_dev, selection_metric="cola"),
                           devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def two_task_run(tiny_checkpoint, small_dev, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mt"))
  result = train.train_and_evaluate(two_task_config(tiny_checkpoint, small_dev), workdir,
                                    devices=jax.devices()[:1])
  return workdir, result


def test_two_task_run_writes_per_task_metrics(two_task_run):
  workdir, result = two_task_run
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [(r["step"], r["task"]) for r in records] == [
      (s, t) for s in (3, 6) for t in ("sst2", "score", "average")]
  sst2, score, average = records[-3:]
  assert "pearson" in score and "spearmanr" in score
  assert average["score"] == pytest.approx((sst2["accuracy"] + score["pearson"]) / 2)
  assert result["eval"]["average"] == average["score"]
  assert result["eval"]["sst2/accuracy"] == sst2["accuracy"]
  assert result["best"]["metrics"]["average"] == max(r["score"] for r in records
                                                     if r["task"] == "average")
  exp, params = runs.load_run(workdir, devices=jax.devices()[:1])
  assert set(params["heads"]) == {"sst2", "score"} and "classifier" not in params
  assert params["heads"]["score"]["classifier"]["kernel"].shape[-1] == 1
  # Re-evaluating the checkpoint gives the same per-task numbers.
  again = evaluate.evaluate_workdir(workdir)
  assert again["sst2/accuracy"] == sst2["accuracy"]
  assert again["average"] == pytest.approx(average["score"], abs=1e-5)  # 8 devices here


def test_multitask_resume_is_bit_exact(tiny_checkpoint, small_dev, two_task_run, tmp_path,
                                       monkeypatch):
  _, full = two_task_run
  config = two_task_config(tiny_checkpoint, small_dev)
  with monkeypatch.context() as patch:  # preempted after step 3 (saved), then rerun
    patch.setattr(resume.PreemptionWatcher, "reached", lambda _, step: step == 3)
    with pytest.raises(Preempted):
      train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  resumed = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  for a, b in zip(jax.tree.leaves(full["state"].params), jax.tree.leaves(resumed["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed["eval"] == full["eval"]


def test_each_task_exports_to_an_hf_directory_with_equal_logits(two_task_run, small_dev,
                                                                tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  workdir, _ = two_task_run
  out = export.export(workdir, str(tmp_path / "out"))
  assert sorted(os.listdir(out)) == ["score", "sst2"]
  exp, params = runs.load_run(workdir, devices=jax.devices()[:1])
  split = exp.tokenize(readers.read_file(small_dev, exp.tasks[0].task, exp.tasks[0].label_names))
  batch = data_lib.pad_rows(split, np.arange(len(split)), 32)
  flax_logits = exp.model.apply({"params": jax.device_get(params)}, batch["input_ids"],
                                batch["attention_mask"], batch["token_type_ids"])
  for i, name in enumerate(("sst2", "score")):
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        os.path.join(out, name), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    config = json.load(open(os.path.join(out, name, "config.json")))
    assert config["problem_type"] == ("single_label_classification" if name == "sst2"
                                      else "regression")
    with torch.no_grad():
      torch_logits = model.eval()(
          input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
          attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
          token_type_ids=torch.tensor(batch["token_type_ids"], dtype=torch.long)).logits.numpy()
    assert np.abs(torch_logits - np.asarray(flax_logits[i])).max() < 1e-4


def test_tfds_reader_with_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    mrpc = dataset_sources.read_tfds("glue/mrpc", "validation", tasks_lib.GLUE_TASKS["mrpc"],
                                     data_dir=str(tmp_path))
    assert len(mrpc) == 12 and all(len(t) == 2 and isinstance(t[0], str) for t in mrpc.texts)
    assert mrpc.labels.dtype == np.int32 and set(mrpc.labels) <= {0, 1}
    assert mrpc.source == "tfds:glue/mrpc:validation"
    # Through the config, as a run reads it (the split name via the task: MNLI's
    # 'validation' is TFDS's 'validation_matched').
    c = default_config()
    c.task_name, c.tfds_name, c.tfds_data_dir = "mnli", "glue/mnli", str(tmp_path)
    task = tasks_lib.get_task(c)
    mnli = dataset_sources.read_split(experiment.source_of(c), task, "validation",
                                      task.label_names)
    assert len(mnli) == 12 and set(mnli.labels) <= {0, 1, 2}
    stsb = dataset_sources.read_tfds("glue/stsb", "train", tasks_lib.GLUE_TASKS["stsb"],
                                     data_dir=str(tmp_path))
    assert stsb.labels.dtype == np.float32
    with pytest.raises(UserError, match="tfds:glue/sst2:validation columns: no column"):
      dataset_sources.read_tfds("glue/sst2", "validation", tasks_lib.GLUE_TASKS["mrpc"],
                                data_dir=str(tmp_path))


def test_glue_multitask_config_resolves_four_heads(glue_dir, tiny_checkpoint):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "glue_multitask.py")
  spec = importlib.util.spec_from_file_location("glue_multitask", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model_name_or_path, config.data_dir = tiny_checkpoint, glue_dir
  exp = experiment.build_experiment(config, devices=jax.devices()[:1])
  assert [h.name for h in exp.tasks] == ["sst2", "cola", "mrpc", "rte"]
  assert exp.selection_key() == "average"
  assert dataset_sources.split_file(exp.tasks[2].source, exp.tasks[2].task, "validation") == (
      os.path.join(glue_dir, "MRPC", "dev.tsv"))
  boxed, _ = exp.abstract_params()
  heads = boxed["heads"]
  assert heads["rte"]["classifier"]["kernel"].value.shape == (32, 2)
