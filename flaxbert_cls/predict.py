"""Inference from a run's workdir or an exported Hugging Face directory.

  predictor = Predictor.from_path("workdirs/sst2")   # or the directory `export` wrote
  predictor.predict(["a gripping film", "dull"])
  # [{'label': '1', 'probabilities': {'0': 0.03, '1': 0.97}}, ...]

  flaxbert-cls predict --model=DIR --input=FILE.{tsv,csv,jsonl} --output=FILE.{csv,jsonl}

Tokenization and batching are the evaluation's (`tokenization.tokenize`, length-sorted
`data.eval_batches` padded to the config's buckets, `evaluate.gather_logits`),
so a workdir predicts exactly what `eval` scored. Results come back in input order.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from flaxbert_cls import data as data_lib
from flaxbert_cls import evaluate as evaluate_lib
from flaxbert_cls import experiment as experiment_lib
from flaxbert_cls import export as export_lib
from flaxbert_cls import hf
from flaxbert_cls import model as model_lib
from flaxbert_cls import progress as progress_lib
from flaxbert_cls import readers
from flaxbert_cls import tasks as tasks_lib
from flaxbert_cls import tokenization
from flaxbert_cls.errors import UserError

log = logging.getLogger(__name__)

OUTPUT_EXTENSIONS = (".csv", ".jsonl")
# For HF directories that carry no flaxbert_cls.json (not written by `export`).
_DEFAULT_TEXT_FIELDS = ("sentence",)
_DEFAULT_MAX_SEQ_LENGTH = 128
_DEFAULT_BUCKETS = (32, 64, 128, 256, 512)
_DEFAULT_BATCH_SIZE = 64
# Prediction ignores gold labels in the input: they may use another label vocabulary.
# The readers look for this column, never find it, and read the file as unlabelled.
_NO_LABEL_FIELD = "\x00no label\x00"


@dataclasses.dataclass
class Predictor:
  """A classification (or regression) model ready to predict; see `from_path`."""

  model: model_lib.BertForSequenceClassification
  params: Any
  tokenizer: Any
  label_names: tuple[str, ...] | None  # None: regression (one score per example)
  task: tasks_lib.Task  # which input columns hold the text; its labels are ignored
  max_seq_length: int
  seq_buckets: tuple[int, ...]
  batch_size: int
  batch_sharding: jax.sharding.Sharding | None = None  # None: one device
  source: str = ""

  def __post_init__(self):
    self._jit_eval = None

  @classmethod
  def from_path(cls, path: str, step: int | str | None = None,
                text_fields: Sequence[str] | None = None,
                batch_size: int | None = None, member: int | str | None = None
                ) -> "Predictor":
    """A workdir (its checkpoint `step`: latest, 'best' or N) or an HF model directory.

    `text_fields` overrides the input columns holding the text (default: the
    run's, or 'sentence' for an HF directory without flaxbert_cls.json).
    """
    path = os.path.abspath(path)
    if _is_workdir(path):
      predictor = cls._from_workdir(path, export_lib.parse_step(step), member)
    elif os.path.isfile(os.path.join(path, "config.json")):
      if step is not None and step != "latest":
        raise UserError(f"--step={step}: {path} is a Hugging Face directory, not a workdir; "
                        "it has one set of weights")
      if member is not None:
        raise UserError(f"--member={member}: {path} is a Hugging Face directory, not a sweep")
      predictor = cls._from_hf_dir(path)
    else:
      raise UserError(f"{path}: neither a flaxbert-cls workdir (config.json, model/, "
                      "checkpoints/) nor a Hugging Face model directory (config.json)")
    if text_fields:
      predictor.task = dataclasses.replace(predictor.task, text_fields=tuple(text_fields),
                                           file_columns=None)
    if batch_size:
      predictor.batch_size = int(batch_size)
    return predictor

  @classmethod
  def _from_workdir(cls, workdir: str, step: int | str | None,
                    member: int | str | None = None) -> "Predictor":
    export_lib.check_step(workdir, step)
    exp, params = experiment_lib.load_run(workdir, step=step, member=member)  # sweep: best
    if exp.multitask:
      raise UserError(f"{workdir}: a multi-task run ({', '.join(t.name for t in exp.tasks)}); "
                      "export it (flaxbert-cls export --output=OUT) and predict with OUT/<task>")
    return cls(exp.model, params, exp.tokenizer, exp.label_names, _unlabelled(exp.task),
               int(exp.config.max_seq_length), tuple(exp.config.seq_buckets),
               int(exp.config.eval_batch_size), exp.batch_sharding, workdir)

  @classmethod
  def _from_hf_dir(cls, directory: str) -> "Predictor":
    hf_config = hf.load_config(directory)
    tokenizer = hf.load_tokenizer(directory, hf_config.vocab_size)
    is_regression = hf_config.problem_type == "regression" or hf_config.num_labels == 1
    label_names = None if is_regression else tuple(
        str(hf_config.id2label[i]) for i in range(hf_config.num_labels))
    model = model_lib.BertForSequenceClassification(hf.model_config(hf_config),
                                                    1 if is_regression else len(label_names))
    dummy = np.ones((1, 8), np.int32)
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, dummy, dummy)))
    params, new, _ = hf.params_from_state_dict(hf.load_state_dict(directory), shapes["params"],
                                               hf_config.model_type)
    if new:
      # A bare encoder (or another task's head) would predict with random weights.
      raise UserError(f"{directory}: no weights for {', '.join(new[:4])}; not a sequence-"
                      "classification model (export a run with `flaxbert-cls export`)")
    meta = {}
    meta_path = os.path.join(directory, export_lib.METADATA_NAME)
    if os.path.isfile(meta_path):
      try:
        with open(meta_path) as f:
          meta = json.load(f)
      except (OSError, ValueError) as e:
        raise UserError(f"{meta_path}: unreadable: {e}") from None
    task = tasks_lib.Task(
        name=meta.get("task_name", "predict"),
        text_fields=tuple(meta.get("text_fields") or _DEFAULT_TEXT_FIELDS),
        label_field=_NO_LABEL_FIELD, label_names=None,
        file_columns=tuple(meta["file_columns"]) if meta.get("file_columns") else None)
    return cls(model, jax.device_put(params), tokenizer, label_names, task,
               int(meta.get("max_seq_length", _DEFAULT_MAX_SEQ_LENGTH)),
               tuple(meta.get("seq_buckets", _DEFAULT_BUCKETS)), _DEFAULT_BATCH_SIZE, None,
               directory)

  @property
  def is_regression(self) -> bool:
    return self.label_names is None

  def predict(self, texts: Sequence[str] | Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """One result per text (or text pair), in order: {'label', 'probabilities'} or {'score'}."""
    rows = _normalize_texts(texts)
    logits = self.logits(tokenization.tokenize(self.tokenizer, rows, None, self.max_seq_length))
    return self._results(logits)

  def logits(self, split: data_lib.TokenizedSplit, progress: bool = False) -> np.ndarray:
    """float32 [n, num_labels] logits of every example of `split`, in its order."""
    if self._jit_eval is None:
      self._jit_eval = evaluate_lib.jit_eval_step(self.model)
    # A bar on a terminal, else a log line every tenth of the batches.
    return evaluate_lib.gather_logits(
        self._jit_eval, self.params, split, self.batch_size, self.seq_buckets,
        self.max_seq_length, self.batch_sharding,
        progress_lib.BatchProgress("predict", log_lines=True) if progress else None)

  def _results(self, logits: np.ndarray) -> list[dict[str, Any]]:
    if self.is_regression:
      return [{"score": float(s)} for s in logits[:, 0]]
    probs = evaluate_lib.softmax(logits)
    return [{"label": self.label_names[int(p.argmax())],
             "probabilities": {n: float(q) for n, q in zip(self.label_names, p)}} for p in probs]

  def predict_file(self, input_path: str, output_path: str) -> dict[str, float]:
    """Predicts every row of a .tsv/.csv/.jsonl file; writes .csv or .jsonl in input order.

    Returns {'rows', 'seconds', 'sentences_per_sec'} (tokenization + model, no file I/O).
    """
    ext = os.path.splitext(output_path)[1].lower()
    if ext not in OUTPUT_EXTENSIONS:  # before any work
      raise UserError(f"--output={output_path}: unknown file type {ext!r}; use one of "
                      f"{list(OUTPUT_EXTENSIONS)}")
    examples = readers.read_file(input_path, self.task, require_labels=False)
    log.info("predict: %d rows from %s with %s", len(examples), input_path, self.source)
    start = time.perf_counter()
    split = tokenization.tokenize(self.tokenizer, examples.texts, None, self.max_seq_length)
    logits = self.logits(split, progress=True)
    seconds = time.perf_counter() - start
    _write_results(output_path, self.task.text_fields, examples.texts, self._results(logits),
                   self.label_names)
    stats = {"rows": len(examples), "seconds": seconds,
             "sentences_per_sec": len(examples) / max(seconds, 1e-9)}
    log.info("predict: wrote %s: %d rows in %.2f s, %.1f sentences/s (tokenization and model; "
             "a first call also compiles). %d rows truncated to %d tokens.", output_path,
             stats["rows"], seconds, stats["sentences_per_sec"], split.num_truncated,
             self.max_seq_length)
    return stats


def predict_file(model: str, input_path: str, output_path: str, step: int | str | None = None,
                 text_fields: Sequence[str] | None = None, member: int | str | None = None
                 ) -> dict[str, float]:
  """`flaxbert-cls predict`: Predictor.from_path(model).predict_file(input, output)."""
  predictor = Predictor.from_path(model, step=step, text_fields=text_fields, member=member)
  return predictor.predict_file(input_path, output_path)


def _is_workdir(path: str) -> bool:
  # An HF directory has config.json and weights; a workdir has these subdirectories.
  return any(os.path.isdir(os.path.join(path, d)) for d in ("checkpoints", "model"))


def _unlabelled(task: tasks_lib.Task) -> tasks_lib.Task:
  return dataclasses.replace(task, label_field=_NO_LABEL_FIELD, label_names=None)


def _normalize_texts(texts: Any) -> list[tuple[str, ...]]:
  if isinstance(texts, (str, tuple)) or not len(texts):
    raise UserError("predict(texts): give a non-empty list of texts or of (text, text) pairs")
  rows = [(t,) if isinstance(t, str) else tuple(t) for t in texts]
  for i, row in enumerate(rows):
    if len(row) != len(rows[0]) or len(row) not in (1, 2):
      raise UserError(f"texts[{i}]: {len(row)} texts; every example needs the same number "
                      "(1, or 2 for pairs)")
    for text in row:
      if not isinstance(text, str):
        raise UserError(f"texts[{i}]: {text!r} is not a string")
      if not text.strip():
        raise UserError(f"texts[{i}]: empty text")
  return rows


def _write_results(path: str, text_fields: Sequence[str], texts: Sequence[tuple[str, ...]],
                   results: list[dict[str, Any]], label_names: tuple[str, ...] | None) -> None:
  """CSV: text columns, label, p_<label>... (or score); JSONL: the same as objects."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w", newline="", encoding="utf-8") as f:
      if path.lower().endswith(".csv"):
        writer = csv.writer(f)
        tail = ["score"] if label_names is None else ["label"] + [f"p_{n}" for n in label_names]
        writer.writerow(list(text_fields) + tail)
        for row, r in zip(texts, results):
          values = ([r["score"]] if label_names is None else
                    [r["label"]] + [r["probabilities"][n] for n in label_names])
          writer.writerow(list(row) + values)
      else:
        for row, r in zip(texts, results):
          f.write(json.dumps(dict(zip(text_fields, row)) | r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file
  except OSError as e:
    raise UserError(f"--output={path}: cannot write: {e}") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
