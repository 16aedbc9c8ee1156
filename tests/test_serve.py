"""Serving: streamed predict (chunks, input order, bounded reads) and int8 ONNX Runtime predict."""

import csv
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from flaxbert_cls.serving import export
from flaxbert_cls.serving import predict
from flaxbert_cls.serving import quantize
from flaxbert_cls.data import streaming
from flaxbert_cls.errors import UserError
import export_fixtures
from numerics import assert_close

pytest.importorskip("transformers")
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed: pip install "
                               "'flaxbert-cls[quantize]' (make install-test installs it)")


@pytest.fixture(scope="module")
def run():
  return export_fixtures.trained_run()


@pytest.fixture(scope="module")
def predictor(run):
  return predict.Predictor.from_path(run.exported)


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_streamed_chunks_keep_input_order_and_match_one_pass(run, predictor, tmp_path):
  source = tmp_path / "dev.jsonl"
  with open(source, "w") as f:
    for i, s in enumerate(run.sentences):
      f.write(json.dumps({"id": i, "sentence": s}) + "\n")
  # 872 rows in chunks of 100: 9 chunks, the last one short; length-sorted inside each.
  stats = predictor.predict_file(str(source), str(tmp_path / "chunked.jsonl"), chunk_rows=100)
  predictor.predict_file(str(source), str(tmp_path / "whole.jsonl"))
  assert stats["rows"] == 872 and stats["examples_per_sec"] > 0
  chunked = [json.loads(l) for l in open(tmp_path / "chunked.jsonl")]
  whole = [json.loads(l) for l in open(tmp_path / "whole.jsonl")]
  assert [r["sentence"] for r in chunked] == run.sentences
  assert [r["label"] for r in chunked] == [r["label"] for r in whole]
  probs = np.array([[r["probabilities"]["0"], r["probabilities"]["1"]] for r in chunked])
  whole_probs = np.array([[r["probabilities"]["0"], r["probabilities"]["1"]] for r in whole])
  assert_close(probs, whole_probs, rel=1e-5)
  assert_close(probs, _softmax(run.logits), rel=1e-4)  # what eval scored
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temporary file left


def test_chunks_are_bounded_and_name_the_right_lines(tmp_path):
  task = predict._unlabelled(export_fixtures.trained_run().exp.task)  # pylint: disable=protected-access
  source = tmp_path / "in.tsv"
  source.write_text("sentence\tlabel\n" + "".join(f"text {i}\t1\n" for i in range(25)) + "\n")
  chunks = list(streaming.read_file_chunks(str(source), task, chunk_rows=10))
  assert [len(c) for c in chunks] == [10, 10, 5]
  assert chunks[2].line_numbers == list(range(22, 27))  # header is line 1
  assert [t for c in chunks for (t,) in c.texts] == [f"text {i}" for i in range(25)]
  # A CSV record spanning two lines, and a bad line in a later chunk.
  quoted = tmp_path / "in.csv"
  quoted.write_text('sentence\n"two\nlines"\nthree\nfour\n')
  assert [c.texts for c in streaming.read_file_chunks(str(quoted), task, 2)] == [
      [("two\nlines",), ("three",)], [("four",)]]
  bad = tmp_path / "bad.jsonl"
  bad.write_text("".join(json.dumps({"sentence": f"s{i}"}) + "\n" for i in range(12))
                 + '{"text": "x"}\n')
  with pytest.raises(UserError, match=r"bad.jsonl line 13: no key 'sentence'"):
    list(streaming.read_file_chunks(str(bad), task, chunk_rows=5))
  gap = tmp_path / "gap.tsv"
  gap.write_text("sentence\na\n\nb\n")
  with pytest.raises(UserError, match=r"gap.tsv line 3: blank line between data rows"):
    list(streaming.read_file_chunks(str(gap), task, chunk_rows=5))


def test_csv_output_streams_with_one_header(run, predictor, tmp_path):
  predictor.predict_file(export_fixtures.DEV, str(tmp_path / "out.csv"), chunk_rows=300)
  rows = list(csv.reader(open(tmp_path / "out.csv", newline="")))
  assert rows[0] == ["sentence", "label", "p_0", "p_1"]
  assert [r[0] for r in rows[1:]] == run.sentences


@needs_ort
def test_int8_export_agrees_with_float32(run, predictor, tmp_path):
  out = export.export(run.workdir, str(tmp_path / "int8"), quantize="int8")
  assert os.path.isfile(os.path.join(out, quantize.INT8_NAME))
  int8 = predict.Predictor.from_path(out, quantize="int8")
  texts = [(s,) for s in run.sentences[:256]]
  split = predict.tokenization.tokenize(predictor.tokenizer, texts, None, 64)
  reference, logits = predictor.logits(split), int8.logits(split)
  # int8 weights and activations: about 1% of the logit scale, and the same decisions.
  assert_close(logits, reference, rel=0.05)
  assert np.mean(logits.argmax(-1) == reference.argmax(-1)) >= 0.95
  # A workdir is exported and quantized on the fly.
  from_workdir = predict.Predictor.from_path(run.workdir, quantize="int8")
  assert_close(from_workdir.logits(split), logits, rel=1e-5)


def test_missing_extra_is_one_line(run, monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
  for call in (lambda: predict.Predictor.from_path(run.exported, quantize="int8"),
               lambda: export.export(run.workdir, str(tmp_path / "x"), quantize="int8")):
    with pytest.raises(UserError) as e:
      call()
    assert str(e.value) == ("--quantize=int8 needs onnxruntime, which is not installed: "
                            "pip install 'flaxbert-cls[quantize]'")
  assert not os.path.exists(tmp_path / "x")  # refused before exporting
  with pytest.raises(UserError, match=r"--quantize=int4: unknown; use one of \['int8'\]"):
    predict.Predictor.from_path(run.exported, quantize="int4")
