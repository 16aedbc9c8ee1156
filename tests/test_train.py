"""End-to-end training behaviour: sharding invariance, exact eval, a real fine-tune."""

import os

import jax
import numpy as np
import pytest

from flaxbert_cls.training import runs
from flaxbert_cls.training import starts
from flaxbert_cls.training import step as step_lib
from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.data import sources as dataset_sources
from flaxbert_cls.training import evaluate
from flaxbert_cls.training import experiment
from flaxbert_cls.training import train
from flaxbert_cls.config import default_config
from model_fixtures import DEMO_DATA, make_tiny_checkpoint, minilm_dir, small_config


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


def test_one_device_and_eight_devices_train_the_same(tiny_checkpoint, tmp_path):
  assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
  one = train.train_and_evaluate(small_config(tiny_checkpoint), str(tmp_path / "one"),
                                 devices=jax.devices()[:1])
  eight = train.train_and_evaluate(small_config(tiny_checkpoint), str(tmp_path / "eight"))
  losses_one = np.array([loss for _, loss in one["train_log"]])
  losses_eight = np.array([loss for _, loss in eight["train_log"]])
  assert len(losses_one) == 10
  assert losses_one[-1] < losses_one[0]  # it learns something
  np.testing.assert_allclose(losses_eight, losses_one, rtol=0, atol=1e-5)
  assert one["eval"]["accuracy"] == eight["eval"]["accuracy"]
  # The batch really was split over 8 devices.
  leaf = jax.tree.leaves(eight["state"].params)[0]
  assert len(leaf.sharding.device_set) == 8


def test_eval_counts_every_example_once(tiny_checkpoint, tmp_path):
  """101 dev rows, eval batch 16 on 8 devices: metrics equal a per-example NumPy reference."""
  dev = tmp_path / "dev.tsv"
  lines = open(os.path.join(DEMO_DATA, "dev.tsv")).read().splitlines()
  dev.write_text("\n".join(lines[:102]) + "\n")  # header + 101 rows
  config = small_config(tiny_checkpoint, validation_file=str(dev), num_train_steps=3,
                        eval_batch_size=16)
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  exp, params = runs.load_run(str(tmp_path / "run"))
  split = exp.tokenize(dataset_sources.read_split(exp.tasks[0].source, exp.task, "validation",
                                                 exp.label_names))
  assert len(split) == 101
  # The reference: no padding and no sharding, each row in a batch of rows of its own length.
  host_params = jax.device_get(params)
  forward = jax.jit(lambda ids, mask, types: exp.model.apply({"params": host_params}, ids, mask,
                                                              types))
  logits = np.zeros((len(split), 2), np.float32)
  for length in np.unique(split.lengths):
    rows = np.flatnonzero(split.lengths == length)
    batch = data_lib.pad_rows(split, rows, int(length))
    assert batch["attention_mask"].all()
    logits[rows] = np.asarray(forward(batch["input_ids"], batch["attention_mask"],
                                      batch["token_type_ids"]))
  expected_accuracy = float(np.mean(logits.argmax(-1) == split.labels))
  assert result["eval"]["accuracy"] == pytest.approx(expected_accuracy, abs=1e-12)
  jit_eval = jax.jit(lambda p, b: evaluate.eval_step(p, b, model=exp.model))
  metrics, eval_logits = evaluate.evaluate(exp, params, split, jit_eval)
  np.testing.assert_allclose(eval_logits, logits, atol=1e-5)
  assert metrics["accuracy"] == result["eval"]["accuracy"]
  # Re-evaluating the saved checkpoint gives the same numbers.
  assert evaluate.evaluate_workdir(str(tmp_path / "run"))["accuracy"] == result["eval"]["accuracy"]


def test_metrics_file_and_workdir_layout(tiny_checkpoint, tmp_path):
  import json
  config = small_config(tiny_checkpoint, num_train_steps=4, eval_every_steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == [2, 4]
  # Scored on exactly the 872 dev rows (no padding row counted): k/872 for an integer k.
  assert all(r["split"] == "validation" and
             r["accuracy"] * 872 == pytest.approx(round(r["accuracy"] * 872), abs=1e-6)
             for r in records)
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["num_train_steps"] == 4 and saved["model_name_or_path"] == tiny_checkpoint
  model_config = json.load(open(tmp_path / "model" / "config.json"))
  assert model_config["id2label"] == {"0": "0", "1": "1"}
  assert os.path.isfile(tmp_path / "model" / "tokenizer.json")
  assert os.path.isdir(tmp_path / "checkpoints" / "4")


@pytest.mark.slow
def test_real_sst2_finetune_beats_majority(glue_dir, tmp_path):
  """MiniLM, 48 steps of 16 real SST-2 examples: dev accuracy well above the majority class.

  (0.78 on this machine, against 0.51 for the majority class.)"""
  config = small_config(minilm_dir(), train_file=os.path.join(glue_dir, "SST-2", "train.tsv"),
                        validation_file=os.path.join(glue_dir, "SST-2", "dev.tsv"),
                        learning_rate=2e-4, num_train_steps=48, warmup_steps=4, batch_size=16,
                        log_every_steps=16, max_seq_length=32, seq_buckets=(16, 32))
  result = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  majority = 444 / 872
  assert result["eval"]["accuracy"] > majority + 0.2, result["eval"]


def test_memory_scheduler_lowers_train_step_temp_memory():
  """config.cpu_scheduler='memory' reaches XLA and lowers the step's temp buffer."""
  from flaxbert_cls.model import bert as model_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data import tasks  # pylint: disable=g-import-not-at-top
  config = default_config()  # mesh (-1, 1, 1): data parallel over the 8 CPU devices
  mesh = sharding_lib.create_mesh(config.mesh_axes, config.mesh_shape)
  bert = model_lib.BertConfig.from_hf(
      dict(vocab_size=5000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
           intermediate_size=512, max_position_embeddings=128, type_vocab_size=2), mesh=mesh,
      activation_rules=sharding_lib.activation_rules(config.logical_axis_rules, mesh))
  sst2 = experiment.RunTask("sst2", tasks.GLUE_TASKS["sst2"], ("0", "1"), config)
  exp = experiment.Experiment(config, (sst2,), None, None,
                              model_lib.BertForSequenceClassification(bert, 2), mesh,
                              sharding_lib.batch_sharding(mesh))
  state, shardings, tx, schedule = starts.create_train_state(exp, 100, None)
  rng = np.random.default_rng(0)
  rows, length = 128, 128  # 16 rows per device
  batch = data_lib.to_global(dict(
      input_ids=rng.integers(5, 5000, (rows, length)).astype(np.int32),
      attention_mask=np.ones((rows, length), np.int32),
      token_type_ids=np.zeros((rows, length), np.int32),
      labels=rng.integers(0, 2, rows).astype(np.int32), weights=np.ones(rows, np.float32)),
                             exp.batch_sharding)
  temp = {}
  for scheduler in ("memory", "concurrency"):
    options = step_lib.train_step_compiler_options(mesh, scheduler)
    assert options == {"xla_cpu_scheduler_type": step_lib._CPU_SCHEDULERS[scheduler]}  # pylint: disable=protected-access
    config.cpu_scheduler = scheduler
    step = step_lib.jit_train_step(exp, state.params, shardings, tx, schedule)  # as training does
    temp[scheduler] = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
  assert temp["memory"] < 0.95 * temp["concurrency"], temp  # measured 87 vs 102 MB
