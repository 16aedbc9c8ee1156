"""Tests for tasks.py, readers.py, dataset_sources.py, metrics.py and the shipped demo data."""

import collections
import dataclasses
import math
import os
import re
import time

import ml_collections
import numpy as np
import pytest

from flaxbert_cls.data import sources as dataset_sources
from flaxbert_cls.decisions import metrics
from flaxbert_cls.data import labels as labels_lib
from flaxbert_cls.data import readers
from flaxbert_cls.data import tasks
from flaxbert_cls.data import batching
from flaxbert_cls.data import packing
from flaxbert_cls.data import tokenization
from flaxbert_cls.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "examples", "data")


def custom_task(**kwargs) -> tasks.Task:
  config = ml_collections.ConfigDict(dict(
      task_name="custom", text_columns=("text",), label_column="label",
      label_names=(), is_regression=False, metrics=()))
  config.update(kwargs)
  return tasks.get_task(config)


def write(tmp_path, name: str, content) -> str:
  path = tmp_path / name
  if isinstance(content, str):
    content = content.encode("utf-8")
  path.write_bytes(content)
  return str(path)


# ----------------------------------------------------------------------------
# Real GLUE files.

GLUE_COUNTS = [
    ("sst2", "train", 67349, {"1": 37569, "0": 29780}),
    ("sst2", "validation", 872, {"1": 444, "0": 428}),
    ("cola", "train", 8551, {"1": 6023, "0": 2528}),
    ("cola", "validation", 1043, {"1": 721, "0": 322}),
    ("mrpc", "train", 3668, {"1": 2474, "0": 1194}),
    ("mrpc", "validation", 408, {"1": 279, "0": 129}),
    ("rte", "train", 2490, {"entailment": 1249, "not_entailment": 1241}),
    ("rte", "validation", 277, {"entailment": 146, "not_entailment": 131}),
]


@pytest.mark.parametrize("name,split,rows,counts", GLUE_COUNTS)
def test_glue_file_rows_and_labels(glue_dir, name, split, rows, counts):
  task = tasks.GLUE_TASKS[name]
  ex = readers.read_file(readers.glue_file(glue_dir, task, split), task)
  assert len(ex) == len(ex.line_numbers) == ex.labels.shape[0] == rows
  assert ex.labels.dtype == np.int32
  got = collections.Counter(task.label_names[i] for i in ex.labels)
  assert got == counts
  assert all(len(t) == len(task.text_fields) for t in ex.texts)
  assert all(s.strip() for t in ex.texts for s in t)


def test_mrpc_bom_is_stripped(glue_dir):
  task = tasks.GLUE_TASKS["mrpc"]
  path = readers.glue_file(glue_dir, task, "train")
  with open(path, "rb") as f:
    assert f.read(3) == b"\xef\xbb\xbf"  # The premise of this test.
  ex = readers.read_file(path, task)
  assert not ex.texts[0][0].startswith("\ufeff")
  assert ex.texts[0][0].startswith("Amrozi accused his brother")
  assert ex.line_numbers[0] == 2


def test_cola_dev_last_line_without_newline(glue_dir):
  task = tasks.GLUE_TASKS["cola"]
  path = readers.glue_file(glue_dir, task, "validation")
  with open(path, "rb") as f:
    data = f.read()
  assert not data.endswith(b"\n")  # The premise of this test.
  last = data.decode("utf-8").split("\n")[-1].split("\t")
  ex = readers.read_file(path, task)
  assert ex.texts[-1] == (last[3],)
  assert ex.labels[-1] == task.label_names.index(last[1])
  assert ex.line_numbers[-1] == 1043


def test_glue_file_paths(glue_dir, tmp_path):
  sst2 = tasks.GLUE_TASKS["sst2"]
  assert readers.glue_file(glue_dir, sst2, "train") == os.path.join(
      glue_dir, "SST-2", "train.tsv")
  # The parent of glue/ works too ($FLAXBERT_DATA).
  assert readers.glue_file(os.path.dirname(glue_dir), sst2, "validation") == (
      os.path.join(os.path.dirname(glue_dir), "glue", "SST-2", "dev.tsv"))
  with pytest.raises(UserError, match=r"QNLI.*dev\.tsv: file not found"):
    readers.glue_file(glue_dir, tasks.GLUE_TASKS["qnli"], "validation")
  with pytest.raises(UserError, match="no split 'dev'"):
    readers.glue_file(glue_dir, sst2, "dev")
  with pytest.raises(UserError, match="not a GLUE task"):
    readers.glue_file(glue_dir, custom_task(), "train")


# ----------------------------------------------------------------------------
# Task registry.


@pytest.mark.parametrize("spelling,name", [
    ("sst2", "sst2"), ("SST-2", "sst2"), ("sst-2", "sst2"), ("CoLA", "cola"),
    ("STS-B", "stsb"), ("MNLI", "mnli"), ("mnli-m", "mnli"), (" rte ", "rte")])
def test_get_task_spellings(spelling, name):
  task = tasks.get_task(ml_collections.ConfigDict({"task_name": spelling}))
  assert task is tasks.GLUE_TASKS[name]


def test_get_task_unknown_lists_known_names():
  with pytest.raises(UserError) as e:
    tasks.get_task(ml_collections.ConfigDict({"task_name": "imdb"}))
  message = str(e.value)
  assert "'imdb'" in message and "\n" not in message
  for name in list(tasks.GLUE_TASKS) + ["custom"]:
    assert f"'{name}'" in message


def test_glue_registry():
  t = tasks.GLUE_TASKS
  assert sorted(t) == sorted(
      ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"])
  # Label ids must agree with the HF 'nyu-mll/glue' ClassLabel ids.
  assert t["rte"].label_names == ("entailment", "not_entailment")
  assert t["qnli"].label_names == ("entailment", "not_entailment")
  assert t["mnli"].label_names == ("entailment", "neutral", "contradiction")
  for name in ("cola", "sst2", "mrpc", "qqp", "wnli"):
    assert t[name].label_names == ("0", "1")
  assert t["stsb"].is_regression and t["stsb"].num_labels == 1
  assert t["stsb"].main_metric == "pearson"
  assert t["mnli"].num_labels == 3
  assert t["cola"].main_metric == "matthews_correlation"
  assert t["mrpc"].main_metric == "f1" and "accuracy" in t["mrpc"].metrics
  assert set(t["qqp"].metrics) == {"accuracy", "f1"}
  assert t["mnli"].glue_files["validation"] == "dev_matched.tsv"
  assert t["mnli"].hf_split_name("validation") == "validation_matched"
  assert t["sst2"].hf_split_name("validation") == "validation"
  assert t["mrpc"].text_fields == ("#1 String", "#2 String")
  assert t["mrpc"].label_field == "Quality"
  assert t["qqp"].label_field == "is_duplicate"
  assert t["stsb"].label_field == "score"
  assert t["mnli"].label_field == "gold_label"
  assert t["cola"].file_columns == ("source", "label", "mark", "sentence")
  for task in t.values():
    assert task.main_metric in task.metrics
    assert set(task.metrics) <= set(metrics.METRIC_NAMES)
    hash(task)  # Frozen and hashable despite the dict fields.


def test_custom_task():
  task = custom_task(text_columns=("premise", "hypothesis"),
                     label_names=(1, 0))
  assert task.name == "custom" and task.is_pair
  assert task.label_names == ("1", "0")  # Ints become strings, order kept.
  assert task.metrics == ("accuracy",) and task.main_metric == "accuracy"
  assert custom_task().label_names is None
  with pytest.raises(ValueError, match="build_label_names"):
    custom_task().num_labels  # pylint: disable=expression-not-assigned
  assert tasks.with_label_names(custom_task(), ("a", "b")).num_labels == 2
  reg = custom_task(is_regression=True)
  assert reg.num_labels == 1 and reg.metrics == ("pearson", "spearmanr")


@pytest.mark.parametrize("kwargs,match", [
    (dict(text_columns=()), "config.text_columns"),
    (dict(text_columns=("a", "b", "c")), "config.text_columns"),
    (dict(label_column=""), "config.label_column"),
    (dict(label_column="text"), "also a text column"),
    (dict(label_names=("a", "a")), "repeated label.*'a'"),
    (dict(label_names=("a",)), "at least 2"),
    (dict(is_regression=True, label_names=("a", "b")), "regression"),
    (dict(metrics=("bleu",)), "unknown metric 'bleu'"),
    (dict(metrics=("pearson",)), "'pearson' does not apply"),
    (dict(label_names=("a", "b", "c"), metrics=("f1",)), "f1_macro"),
    (dict(main_metric="f1"), "'f1' is not in config.metrics"),
])
def test_custom_task_errors(kwargs, match):
  with pytest.raises(UserError, match=match):
    custom_task(**kwargs)


# ----------------------------------------------------------------------------
# Bad input: every case names the file and the line or column.

SST2 = tasks.GLUE_TASKS["sst2"]
RTE = tasks.GLUE_TASKS["rte"]

BAD_INPUTS = [
    # (name, file name, content, task, pattern after the file path)
    ("empty", "e.tsv", "", SST2, ": file is empty"),
    ("whitespace only", "w.tsv", "\n\n  \n", SST2, ": file is empty"),
    ("header only", "h.tsv", "sentence\tlabel\n", SST2, ": no data rows"),
    ("missing column", "m.tsv", "text\tlabel\ngood\t1\n", SST2,
     r" line 1: no column 'sentence' .*found columns \['text', 'label'\]"),
    ("missing label column", "l.tsv", "sentence\tscore\ngood\t1\n", SST2,
     r" line 1: no column 'label' .*found columns \['sentence', 'score'\]"),
    ("unknown label", "u.tsv", "sentence\tlabel\ngood\t1\nmeh\tmaybe\n", SST2,
     r" line 3: label 'maybe' is not one of \['0', '1'\]"),
    ("unknown label rte", "r.tsv",
     "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tneutral\n", RTE,
     r" line 2: label 'neutral' is not one of \['entailment', "
     r"'not_entailment'\]"),
    ("too few fields", "f.tsv", "sentence\tlabel\ngood\t1\nbad 0\n", SST2,
     r" line 3: 1 tab-separated fields, expected 2"),
    ("too many fields", "g.tsv", "sentence\tlabel\ngood\t1\t\n", SST2,
     r" line 2: 3 tab-separated fields, expected 2"),
    ("non-utf8", "n.tsv", b"sentence\tlabel\ngood\t1\ncaf\xe9\t1\n", SST2,
     r" line 3: not valid UTF-8 \(byte 0xe9 at byte column 4\)"),
    ("empty text", "t.tsv", "sentence\tlabel\ngood\t1\n \t0\n", SST2,
     r" line 3: column 'sentence' is empty"),
    ("empty label", "el.tsv", "sentence\tlabel\ngood\t\n", SST2,
     r" line 2: label is empty"),
    ("blank line in middle", "b.tsv", "sentence\tlabel\ngood\t1\n\nbad\t0\n",
     SST2, r" line 3: blank line"),
    ("duplicate column", "d.tsv", "sentence\tsentence\tlabel\na\tb\t1\n",
     SST2, r" line 1: column 'sentence' appears 2 times"),
    ("unknown extension", "x.txt", "good\t1\n", SST2,
     r": unknown file type '.txt'"),
    ("csv field count", "c.csv", "sentence,label\ngood, fun,1\n", SST2,
     r" line 2: 3 comma-separated fields, expected 2"),
    ("csv bad quoting", "q.csv", 'sentence,label\n"good" fun,1\n', SST2,
     r" line 2: bad CSV"),
    ("jsonl bad json", "j.jsonl", '{"sentence": "a", "label": 1}\n{"sentence"\n',
     SST2, r" line 2 column \d+: not valid JSON"),
    ("jsonl missing key", "k.jsonl",
     '{"sentence": "a", "label": 1}\n{"text": "b", "label": 0}\n', SST2,
     r" line 2: no key 'sentence' .*found keys \['text', 'label'\]"),
    ("jsonl missing label", "ml.jsonl",
     '{"sentence": "a", "label": 1}\n{"sentence": "b"}\n', SST2,
     r" line 2: no key 'label'"),
    ("jsonl not object", "o.jsonl", '{"sentence": "a", "label": 1}\n[1]\n',
     SST2, r" line 2: expected a JSON object"),
    ("jsonl array", "a.json", '[{"sentence": "a", "label": 1}]\n', SST2,
     r" line 1: found a JSON array"),
    ("jsonl bool label", "bl.jsonl", '{"sentence": "a", "label": true}\n',
     SST2, r" line 1: label True is a boolean"),
    ("jsonl null text", "nt.jsonl", '{"sentence": null, "label": 1}\n', SST2,
     r" line 1: column 'sentence' is empty"),
    ("jsonl number text", "it.jsonl", '{"sentence": 5, "label": 1}\n', SST2,
     r" line 1: column 'sentence' holds 5, expected text"),
    ("regression not a number", "s.tsv",
     "sentence1\tsentence2\tscore\na\tb\t4.5\nc\td\thigh\n",
     tasks.GLUE_TASKS["stsb"],
     r" line 3: label 'high' is not a number"),
    ("regression nan", "sn.tsv", "sentence1\tsentence2\tscore\na\tb\tnan\n",
     tasks.GLUE_TASKS["stsb"], r" line 2: label 'nan' is not a finite"),
]


@pytest.mark.parametrize("name,file_name,content,task,pattern", BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(tmp_path, name, file_name, content, task, pattern):
  del name
  path = write(tmp_path, file_name, content)
  with pytest.raises(UserError) as e:
    readers.read_file(path, task)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(path), message
  assert re.search(pattern, message[len(path):]), message


def test_missing_file(tmp_path):
  path = str(tmp_path / "nope.tsv")
  with pytest.raises(UserError, match=re.escape(f"{path}: file not found")):
    readers.read_file(path, SST2)
  with pytest.raises(UserError, match="is a directory"):
    readers.read_file(str(tmp_path), SST2)


def test_tsv_quotes_crlf_and_trailing_blank_lines(tmp_path):
  # Unbalanced quotes are text; CRLF endings and final blank lines are fine.
  path = write(tmp_path, "q.tsv",
               'sentence\tlabel\r\n"it \'s good\t1\r\nbad "\t0\r\n\r\n\n')
  ex = readers.read_file(path, SST2)
  assert ex.texts == [('"it \'s good',), ('bad "',)]
  assert ex.labels.tolist() == [1, 0]
  assert ex.line_numbers == [2, 3]
  assert ex.where(1) == f"{path} line 3"


def test_tsv_keeps_unusual_characters(tmp_path):
  # '\x0c' and '\u2028' end lines for str.splitlines(); not in a TSV row.
  path = write(tmp_path, "u.tsv", "sentence\tlabel\na\x0cb\u2028c\t1\n")
  assert readers.read_file(path, SST2).texts == [("a\x0cb\u2028c",)]


def test_cola_test_file_with_header_and_no_labels(tmp_path):
  cola = tasks.GLUE_TASKS["cola"]
  path = write(tmp_path, "test.tsv", "index\tsentence\n0\tBill left.\n")
  ex = readers.read_file(path, cola, require_labels=False)
  assert ex.texts == [("Bill left.",)] and ex.labels is None
  with pytest.raises(UserError, match="no column 'label'"):
    readers.read_file(path, cola)


def test_csv_quoted_commas_and_multiline_records(tmp_path):
  task = custom_task()
  path = write(tmp_path, "c.csv",
               "id,text,label\n"
               '1,"good, really ""good""",pos\n'
               '2,"two\nlines",neg\n'
               "3,plain,pos\n")
  ex = readers.read_file(path, task, label_names=("neg", "pos"))
  assert ex.texts == [('good, really "good"',), ("two\nlines",), ("plain",)]
  assert ex.labels.tolist() == [1, 0, 1]
  assert ex.line_numbers == [2, 3, 5]  # The line each record starts on.
  bad = write(tmp_path, "b.csv", "text,label\na,pos\nb,neutral\n")
  with pytest.raises(UserError,
                     match=r"b\.csv line 3: label 'neutral' is not one of"):
    readers.read_file(bad, task, label_names=("neg", "pos"))


def test_jsonl_int_labels_custom(tmp_path):
  path = write(tmp_path, "d.jsonl",
               '{"text": "a", "label": 1}\n{"text": "b", "label": "0"}\n'
               '{"text": "c", "label": 10}\n')
  task = custom_task(label_names=(0, 1, 10))  # Int label names from config.
  ex = readers.read_file(path, task)
  assert ex.labels.tolist() == [1, 0, 2]
  assert readers.build_label_names(path, custom_task()) == ("0", "1", "10")
  # GLUE SST-2 in JSON Lines with int labels.
  path = write(tmp_path, "s.jsonl", '{"sentence": "fine", "label": 1}\n')
  assert readers.read_file(path, SST2).labels.tolist() == [1]


def test_jsonl_unlabelled_prediction_input(tmp_path):
  path = write(tmp_path, "p.jsonl", '{"text": "a"}\n{"text": "b"}\n')
  ex = readers.read_file(path, custom_task(), require_labels=False)
  assert ex.labels is None and len(ex) == 2
  mixed = write(tmp_path, "m.jsonl",
                '{"text": "a"}\n{"text": "b", "label": "x"}\n')
  with pytest.raises(UserError, match=r"m\.jsonl line 2: has key"):
    readers.read_file(mixed, custom_task(), require_labels=False)


def test_regression_labels(tmp_path):
  stsb = tasks.GLUE_TASKS["stsb"]
  path = write(tmp_path, "s.tsv",
               "index\tsentence1\tsentence2\tscore\n0\ta\tb\t4.5\n1\tc\td\t0\n")
  ex = readers.read_file(path, stsb)
  assert ex.labels.dtype == np.float32
  assert ex.labels.tolist() == [4.5, 0.0]


def test_custom_example_file():
  path = os.path.join(DEMO, "custom_example.jsonl")
  task = custom_task()
  names = readers.build_label_names(path, task)
  assert names == ("negative", "positive")
  ex = readers.read_file(path, tasks.with_label_names(task, names))
  assert len(ex) == 10 and sorted(np.bincount(ex.labels)) == [5, 5]


@pytest.mark.parametrize("labels,expected", [
    (["10", "2", "1", "2"], ("1", "2", "10")),
    ([3, 1, 2], ("1", "2", "3")),
    (["-1", "1", "0"], ("-1", "0", "1")),
    (["0.5", "1", "0"], ("0", "0.5", "1")),
    (["pos", "neg", "neutral"], ("neg", "neutral", "pos")),
    (["class10", "class2", "class1"], ("class1", "class2", "class10")),
    (["b", "a", "10", "9"], ("9", "10", "a", "b")),
])
def test_sort_label_names(labels, expected):
  assert labels_lib.sort_label_names(labels) == expected


def test_build_label_names(tmp_path):
  path = write(tmp_path, "l.tsv", "text\tlabel\na\t10\nb\t2\nc\t1\nd\t2\n")
  assert readers.build_label_names(path, custom_task()) == ("1", "2", "10")
  one = write(tmp_path, "one.tsv", "text\tlabel\na\tx\nb\tx\n")
  with pytest.raises(UserError, match=r"one\.tsv: found only .*\['x'\]"):
    readers.build_label_names(one, custom_task())


# ----------------------------------------------------------------------------
# Hugging Face datasets.


def test_hf_csv_and_json(tmp_path):
  cache = str(tmp_path / "cache")
  task = custom_task()
  csv_path = write(tmp_path, "d.csv",
                   'text,label\n"hello, world",pos\nbad,neg\nok,pos\n')
  assert dataset_sources.hf_label_names("csv", None, "train", task, data_files=csv_path,
                                        cache_dir=cache) == ("neg", "pos")
  ex = dataset_sources.read_hf_dataset("csv", None, "train", task, ("neg", "pos"),
                                       data_files=csv_path, cache_dir=cache)
  assert ex.texts == [("hello, world",), ("bad",), ("ok",)]
  assert ex.labels.tolist() == [1, 0, 1]
  assert ex.line_numbers == [0, 1, 2]
  assert ex.source.startswith("hf:csv") and ex.source.endswith(":train")
  # Int labels (pandas int64) match label names '0', '1'.
  json_path = write(tmp_path, "d.jsonl",
                    '{"sentence": "a", "label": 1}\n'
                    '{"sentence": "b", "label": 0}\n')
  ex = dataset_sources.read_hf_dataset("json", None, "train", SST2,
                                       data_files=json_path, cache_dir=cache)
  assert ex.labels.tolist() == [1, 0]
  bad = write(tmp_path, "bad.jsonl", '{"sentence": "a", "label": 7}\n')
  with pytest.raises(UserError, match=r"row 0: label '7' is not one of"):
    dataset_sources.read_hf_dataset("json", None, "train", SST2, data_files=bad,
                                    cache_dir=cache)
  with pytest.raises(UserError, match=r"no column 'sentence'.*found columns"):
    dataset_sources.read_hf_dataset("csv", None, "train", SST2, data_files=csv_path,
                                    cache_dir=cache)


def test_hf_class_label_mapping():
  wnli = tasks.GLUE_TASKS["wnli"]
  # HF: 0 = not_entailment, 1 = entailment; files: '0', '1'. Map by id.
  labels, names = dataset_sources._map_class_label(  # pylint: disable=protected-access
      "hf:x", [1, 0], ["not_entailment", "entailment"], wnli, None)
  assert labels == ["1", "0"] and names == ("0", "1")
  mnli = tasks.GLUE_TASKS["mnli"]
  labels, _ = dataset_sources._map_class_label(  # pylint: disable=protected-access
      "hf:x", [2, 0], ["entailment", "neutral", "contradiction"], mnli, None)
  assert labels == ["contradiction", "entailment"]
  # Custom task: by name, whatever the order of label_names.
  labels, _ = dataset_sources._map_class_label(  # pylint: disable=protected-access
      "hf:x", [0, 1], ["neg", "pos"], custom_task(), ("pos", "neg"))
  assert labels == ["neg", "pos"]
  with pytest.raises(UserError, match="do not match the label names"):
    dataset_sources._map_class_label(  # pylint: disable=protected-access
        "hf:x", [0], ["negative", "positive"], custom_task(), ("pos", "neg"))
  with pytest.raises(UserError, match=r"row 1: no label \(class id -1\)"):
    dataset_sources._map_class_label(  # pylint: disable=protected-access
        "hf:x", [0, -1], ["neg", "pos"], custom_task(), None)


def test_hf_hub_offline_error(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  start = time.time()
  with pytest.raises(UserError) as e:
    dataset_sources.read_hf_dataset("nyu-mll/glue", "sst2", "train", SST2,
                                    cache_dir=str(tmp_path / "cache"))
  assert time.time() - start < 20
  message = str(e.value)
  assert "\n" not in message
  assert "'nyu-mll/glue'" in message and "offline" in message


# ----------------------------------------------------------------------------
# Metrics, against values worked out by hand.


def test_metrics_classification():
  # y: 1 1 1 1 0 0 0 ; p: 1 1 1 0 1 0 0 -> TP=3 FN=1 FP=1 TN=2.
  y = np.array([1, 1, 1, 1, 0, 0, 0])
  p = np.array([1, 1, 1, 0, 1, 0, 0])
  out = metrics.compute_metrics(
      ["accuracy", "f1", "f1_macro", "matthews_correlation"], p, y)
  assert all(type(v) is float for v in out.values())  # pylint: disable=unidiomatic-typecheck
  assert out["accuracy"] == pytest.approx(5 / 7)
  # precision = recall = 3/4.
  assert out["f1"] == pytest.approx(3 / 4)
  # class 0: precision = recall = 2/3.
  assert out["f1_macro"] == pytest.approx((3 / 4 + 2 / 3) / 2)
  # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 5 / sqrt(4*4*3*3).
  assert out["matthews_correlation"] == pytest.approx(5 / 12)


def test_metrics_edge_cases():
  y = np.array([0, 1, 0, 1])
  # Constant predictions: MCC 0, F1 0 (no positive prediction).
  out = metrics.compute_metrics(["matthews_correlation", "f1"],
                                np.zeros(4, np.int32), y)
  assert out == {"matthews_correlation": 0.0, "f1": 0.0}
  assert metrics.compute_metrics(["f1_macro"], np.array([0, 1, 2]),
                                 np.array([0, 1, 1]))["f1_macro"] == (
                                     pytest.approx((1 + 2 / 3 + 0) / 3))
  with pytest.raises(ValueError, match="f1_macro"):
    metrics.compute_metrics(["f1"], np.array([0, 2]), np.array([0, 1]))
  with pytest.raises(ValueError, match="class ids"):
    metrics.compute_metrics(["accuracy"], np.array([0.3, 0.9]), y[:2])
  with pytest.raises(ValueError, match="3 predictions for 4 labels"):
    metrics.compute_metrics(["accuracy"], y[:3], y)
  with pytest.raises(UserError, match="unknown metric.*'bleu'"):
    metrics.compute_metrics(["bleu"], y, y)


def test_metrics_regression():
  x = np.array([1.0, 2.0, 3.0])
  y = np.array([1.0, 2.0, 4.0])
  out = metrics.compute_metrics(["pearson", "spearmanr"], x, y)
  # cov = 3, var_x = 2, var_y = 42/9 (sums of squared deviations).
  assert out["pearson"] == pytest.approx(3 / math.sqrt(2 * 42 / 9))
  assert out["spearmanr"] == pytest.approx(1.0)
  # Rank differences d = (0, 1, 1, 0): 1 - 6 * 2 / (4 * 15) = 0.8.
  rho = metrics.compute_metrics(["spearmanr"], np.array([1., 2., 3., 4.]),
                                np.array([1., 3., 2., 4.]))["spearmanr"]
  assert rho == pytest.approx(0.8)
  assert metrics.compute_metrics(["pearson"], -x, x)["pearson"] == (
      pytest.approx(-1.0))
  assert math.isnan(metrics.compute_metrics(["pearson"], np.ones(3), x)[
      "pearson"])


# ----------------------------------------------------------------------------
# Demo data shipped in examples/data.


def _lines(path: str) -> list[bytes]:
  with open(path, "rb") as f:
    data = f.read()
  assert data.endswith(b"\n")
  return data[:-1].split(b"\n")


def test_demo_data_reads():
  train = readers.read_file(os.path.join(DEMO, "sst2", "train.tsv"), SST2)
  dev = readers.read_file(os.path.join(DEMO, "sst2", "dev.tsv"), SST2)
  assert len(train) == 8000 and len(dev) == 872
  assert set(np.bincount(train.labels).tolist()) == {4502, 3498}


def test_demo_data_matches_glue(glue_dir):
  demo = _lines(os.path.join(DEMO, "sst2", "train.tsv"))
  real = _lines(os.path.join(glue_dir, "SST-2", "train.tsv"))
  assert demo[0] == real[0] == b"sentence\tlabel"
  assert len(demo) - 1 == 8000
  # Each row comes from the real file, no more often than it occurs there
  # (SST-2 train holds some identical rows).
  missing = collections.Counter(demo[1:]) - collections.Counter(real[1:])
  assert not missing
  # Shuffled: not in the order of the original file.
  position = {row: i for i, row in enumerate(real)}
  order = [position[row] for row in demo[1:]]
  assert order != sorted(order)
  with open(os.path.join(DEMO, "sst2", "dev.tsv"), "rb") as f:
    demo_dev = f.read()
  with open(os.path.join(glue_dir, "SST-2", "dev.tsv"), "rb") as f:
    assert demo_dev == f.read()


def test_make_demo_data_is_deterministic(glue_dir, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "make_demo_data.py"),
       f'--sst2_dir={os.path.join(glue_dir, "SST-2")}',
       f"--out_dir={tmp_path}"], check=True, capture_output=True)
  for name in ("train.tsv", "dev.tsv"):
    with open(tmp_path / name, "rb") as a, open(
        os.path.join(DEMO, "sst2", name), "rb") as b:
      assert a.read() == b.read(), name


def test_multi_hot_labels_follow_rows_documents_and_packed_slots():
  """Padding (-1) gets zero labels on every layout; a multi-hot row keeps its labels axis
  (documents used to broadcast [docs] against [docs, labels] along the wrong axis)."""
  labels = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
  split = tokenization.TokenizedSplit(np.arange(1, 10, dtype=np.int32), np.zeros(9, np.int8),
                                      np.array([0, 3, 6, 9]), labels)
  np.testing.assert_array_equal(batching.pad_rows(split, np.array([2, -1]), 4)["labels"],
                                [[1, 1], [0, 0]])
  np.testing.assert_array_equal(
      packing.pad_packed(split, np.array([[0, 1], [2, -1]]), 8)["labels"],
      [[[1, 0], [0, 1]], [[1, 1], [0, 0]]])
  documents = dataclasses.replace(split, labels=labels[:2], documents=np.array([0, 2, 3]))
  got = batching.pad_documents(documents, np.array([1, -1]), 4, 2)["labels"]
  np.testing.assert_array_equal(got, [[0, 1], [0, 0]])
  assert got.dtype == np.float32
