"""Re-fine-tuning from a previous run's workdir or its export: the head kept by label name."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from flaxbert_cls.training import runs
from flaxbert_cls.training import experiment
from flaxbert_cls.serving import export
from flaxbert_cls.model import hf
from flaxbert_cls.training import starts as refinetune
from flaxbert_cls.training import train
from flaxbert_cls.config import default_config
from flaxbert_cls.errors import UserError
from model_fixtures import DEMO_DATA, make_tiny_checkpoint

HEAD = [("classifier", "kernel"), ("classifier", "bias")]
ONE_DEVICE = jax.devices()[:1]  # one device compiles faster than conftest's eight


def write_data(path, labels, rows=64):
  sentences = [line.split("\t")[0].strip()
               for line in open(os.path.join(DEMO_DATA, "train.tsv")).read().splitlines()[1:]]
  with open(path, "w") as f:
    for i in range(rows):
      f.write(json.dumps({"text": sentences[i], "label": labels[i % len(labels)]}) + "\n")
  return str(path)


def config(model, train_file, **overrides):
  c = default_config()
  c.update(model_name_or_path=model, task_name="custom", text_columns=("text",),
           label_column="label", train_file=train_file, validation_file=train_file,
           max_seq_length=32, seq_buckets=(32,), batch_size=16, eval_batch_size=16,
           learning_rate=1e-3, num_train_steps=2, warmup_steps=0, log_every_steps=1)
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A tiny run trained 2 steps on labels a, b, c, and its export."""
  root = tmp_path_factory.mktemp("refinetune")
  checkpoint = make_tiny_checkpoint(str(root / "tiny"), hidden=16, layers=1, heads=2)
  workdir = str(root / "base")
  train.train_and_evaluate(config(checkpoint, write_data(root / "abc.jsonl", "abc")), workdir,
                           devices=ONE_DEVICE)
  exported = export.export(workdir, str(root / "exported"), None)
  _, params = runs.load_run(workdir)
  return {"root": root, "workdir": workdir, "export": exported,
          "params": traverse_util.flatten_dict(jax.device_get(params))}


def start_params(model, train_file, seed=42, **overrides):
  """The parameters a run from `model` holds at step 0, and its experiment."""
  exp = experiment.build_experiment(config(model, train_file, seed=seed, **overrides),
                                    devices=ONE_DEVICE)
  pretrained = hf.resolve(model) if model else None
  state, *_ = refinetune.create_train_state(exp, 10, pretrained)
  return traverse_util.flatten_dict(jax.device_get(state.params)), exp


@pytest.mark.parametrize("start", ["workdir", "export"])
def test_same_labels_keep_every_parameter_bit_exact(base_run, start):
  data = write_data(base_run["root"] / "cab.jsonl", "cab")  # same set, another first-seen order
  params, exp = start_params(base_run[start], data)
  assert exp.label_names == ("a", "b", "c")
  assert params.keys() == base_run["params"].keys()
  for path, value in base_run["params"].items():
    np.testing.assert_array_equal(params[path], value, err_msg="/".join(path))
  record = exp.started_from
  assert record["kind"] == {"workdir": "workdir", "export": "hf_directory"}[start]
  assert record["step"] == (2 if start == "workdir" else None)
  assert record["head"] == {"kept": ["a", "b", "c"], "new": [], "dropped": []}


def test_workdir_and_its_export_hash_the_same(base_run):
  data = write_data(base_run["root"] / "abc2.jsonl", "abc")
  hashes = {start_params(base_run[s], data)[1].started_from["params_blake2b"]
            for s in ("workdir", "export")}
  assert len(hashes) == 1


def test_new_label_extends_the_head(base_run):
  data = write_data(base_run["root"] / "abcd.jsonl", "abcd")
  params, exp = start_params(base_run["workdir"], data)
  fresh, _ = start_params(os.path.join(base_run["root"], "tiny"), data)  # same seed, new head
  assert exp.label_names == ("a", "b", "c", "d")
  for path in HEAD:
    np.testing.assert_array_equal(params[path][..., :3], base_run["params"][path])
    np.testing.assert_array_equal(params[path][..., 3], fresh[path][..., 3])
  assert exp.started_from["head"] == {"kept": ["a", "b", "c"], "new": ["d"], "dropped": []}


def test_removed_label_is_refused_unless_dropped(base_run):
  data = write_data(base_run["root"] / "ac.jsonl", "ac")
  with pytest.raises(UserError) as e:
    start_params(base_run["workdir"], data)
  assert "\n" not in str(e.value)
  assert "labels ['b'] of the start" in str(e.value) and "drop_removed_labels" in str(e.value)
  params, exp = start_params(base_run["workdir"], data, drop_removed_labels=True)
  for path in HEAD:
    old = base_run["params"][path]
    np.testing.assert_array_equal(params[path], np.stack([old[..., 0], old[..., 2]], -1))
  assert exp.started_from["head"]["dropped"] == ["b"]


def test_regression_start_for_a_classifier_is_refused():
  with pytest.raises(UserError, match="regression model"):
    refinetune.head_rows(None, ("a", "b"), False, "start")
  assert refinetune.head_rows(None, ("a", "b"), True, "start") == [None, None]
  assert refinetune.head_rows(("b", "a"), ("a", "b", "z"), False, "start") == [1, 0, None]


def test_a_refinetuned_run_records_where_it_started(base_run):
  # The base run's shapes: its compiled programs come from the persistent cache.
  data = write_data(base_run["root"] / "bca.jsonl", "bca")
  workdir = str(base_run["root"] / "again")
  train.train_and_evaluate(config(base_run["workdir"], data, start_step="2"), workdir,
                           devices=ONE_DEVICE)
  record = json.load(open(os.path.join(workdir, refinetune.STARTED_FROM_NAME)))
  assert record["path"] == os.path.abspath(base_run["workdir"])
  assert record["kind"] == "workdir" and record["step"] == 2
  assert record["label_names"] == ["a", "b", "c"]
  assert record["head"]["kept"] == ["a", "b", "c"] and len(record["params_blake2b"]) == 32
  saved = json.load(open(os.path.join(workdir, "model", "config.json")))
  assert saved["id2label"] == {"0": "a", "1": "b", "2": "c"}
  # The export carries it on.
  exported = export.export(workdir, str(base_run["root"] / "again_exported"))
  assert json.load(open(os.path.join(exported, export.METADATA_NAME)))["started_from"] == record


def test_bad_start_step_is_one_line(base_run):
  data = write_data(base_run["root"] / "abc3.jsonl", "abc")
  with pytest.raises(UserError, match="no checkpoint at step 7"):
    start_params(base_run["workdir"], data, start_step="7")
  with pytest.raises(UserError, match="config.start_step"):
    start_params(base_run["workdir"], data, start_step="first")


def test_a_checkpoint_with_default_label_names_keeps_its_head_by_position(base_run):
  unnamed = str(base_run["root"] / "unnamed")
  shutil.copytree(base_run["export"], unnamed)
  with open(os.path.join(unnamed, "config.json")) as f:
    hf_config = json.load(f)
  hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(3)}
  hf_config["label2id"] = {f"LABEL_{i}": i for i in range(3)}
  with open(os.path.join(unnamed, "config.json"), "w") as f:
    json.dump(hf_config, f)
  params, exp = start_params(unnamed, write_data(base_run["root"] / "xyz.jsonl", "xyz"))
  for path in HEAD:  # transformers' default names say nothing: rows kept by position
    np.testing.assert_array_equal(params[path], base_run["params"][path])
  assert exp.started_from["head"] == {"kept": ["x", "y", "z"], "new": [], "dropped": []}
  params, exp = start_params(unnamed, write_data(base_run["root"] / "xy.jsonl", "xy"))
  assert exp.started_from["head"]["new"] == ["x", "y"]  # another size: a new head
