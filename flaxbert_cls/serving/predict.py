"""Inference from a run's workdir or an exported Hugging Face directory.

  predictor = Predictor.from_path("workdirs/sst2")   # or the directory `export` wrote
  predictor.predict(["a gripping film", "dull"])
  # [{'label': '1', 'probabilities': {'0': 0.03, '1': 0.97}}, ...]

  flaxbert-cls predict --model=DIR --input=FILE.{tsv,csv,jsonl} --output=FILE.{csv,jsonl}
      [--quantize=int8]

Tokenization and batching are the evaluation's (`tokenization.tokenize`, length-sorted
`data.eval_batches` padded to the config's buckets, `evaluate.gather_logits`),
so a workdir predicts exactly what `eval` scored. Results come back in input order.
A file is streamed: read, tokenized, predicted and written `chunk_rows` rows at a time
(bounded memory for any file size), with the batch sharded over all local devices.
`quantize='int8'` predicts with ONNX Runtime's int8 model instead (`quantize.py`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from flaxbert_cls.data import batching as data_lib
from flaxbert_cls.decisions import baseline as baseline_lib
from flaxbert_cls.decisions import ensemble as ensemble_lib
from flaxbert_cls.decisions import tuning as decisions_lib
from flaxbert_cls.training import evaluate as evaluate_lib
from flaxbert_cls.training import checkpoints as checkpoint_lib
from flaxbert_cls.training import runs
from flaxbert_cls.serving import export as export_lib
from flaxbert_cls.model import hf
from flaxbert_cls.model import bert as model_lib
from flaxbert_cls.training import progress as progress_lib
from flaxbert_cls.serving import output_format
from flaxbert_cls.serving import quantize as quantize_lib
from flaxbert_cls.data import streaming
from flaxbert_cls.model import sharding as sharding_lib
from flaxbert_cls.data import tasks as tasks_lib
from flaxbert_cls.data import tokenization
from flaxbert_cls import workdir as files
from flaxbert_cls.errors import UserError

log = logging.getLogger(__name__)

OUTPUT_EXTENSIONS = (".csv", ".jsonl")
# For HF directories that carry no flaxbert_cls.json (not written by `export`).
_DEFAULT_TEXT_FIELDS = ("sentence",)
_DEFAULT_MAX_SEQ_LENGTH = 128
_DEFAULT_BUCKETS = (32, 64, 128, 256, 512)
_DEFAULT_BATCH_SIZE = 64
# Rows read, tokenized and predicted at a time: bounds memory; large enough that each
# length bucket fills its batches.
CHUNK_ROWS = 65536
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
  # Temperature and thresholds saved with the run or its export; None: argmax of softmax.
  decisions: decisions_lib.Decisions | None = None
  # How texts longer than max_seq_length are read (the run's long_document keys).
  layout: tokenization.Layout = tokenization.TRUNCATE
  window_pooling: str = "mean"
  quantized: quantize_lib.OnnxClassifier | None = None  # set: predicts with it, not `params`
  # decisions.blend_weight set: the run's TF-IDF baseline (a scikit-learn pipeline) it blends.
  baseline: Any = None

  def __post_init__(self):
    self._jit_eval = None

  @classmethod
  def from_path(cls, path: str, step: int | str | None = None,
                text_fields: Sequence[str] | None = None,
                batch_size: int | None = None, quantize: str | None = None,
                member: int | str | None = None,
                devices: Sequence[jax.Device] | None = None) -> "Predictor":
    """A workdir (its checkpoint `step`: latest, 'best' or N) or an HF model directory.

    `text_fields` overrides the input columns holding the text (default: the
    run's, or 'sentence' for an HF directory without flaxbert_cls.json).
    `quantize='int8'`: predict with the int8 ONNX model (`quantize.load_int8`).
    `devices`: where to predict (default: every device; a pod's predict gives each process
    its local ones, `pod_predict.py`).
    """
    quantize_lib.check_mode(quantize)
    path = os.path.abspath(path)
    if _is_workdir(path):
      predictor = cls._from_workdir(path, checkpoint_lib.parse_step(step), member, devices)
    elif os.path.isfile(os.path.join(path, "config.json")):
      if step is not None and step != "latest":
        raise UserError(f"--step={step}: {path} is a Hugging Face directory, not a workdir; "
                        "it has one set of weights")
      if member is not None:
        raise UserError(f"--member={member}: {path} is a Hugging Face directory, not a sweep")
      predictor = cls._from_hf_dir(path, devices)
    else:
      raise UserError(f"{path}: neither a flaxbert-cls workdir (config.json, model/, "
                      "checkpoints/) nor a Hugging Face model directory (config.json)")
    if text_fields:
      predictor.task = dataclasses.replace(predictor.task, text_fields=tuple(text_fields),
                                           file_columns=None)
    if batch_size:
      predictor.batch_size = int(batch_size)
    if predictor.batch_sharding is not None:  # whole batches per device
      shards = predictor.batch_sharding.mesh.size
      predictor.batch_size = -(-predictor.batch_size // shards) * shards
    if quantize and isinstance(predictor.params, runs.Members):
      raise UserError(f"--quantize={quantize}: {path} is an ensemble (every member averaged); "
                      "int8 takes one model: predict without --quantize, or one member")
    if quantize:
      predictor.quantized = export_lib.load_int8(path, _is_workdir(path),
                                                   checkpoint_lib.parse_step(step), member)
      predictor.quantized.window_pooling = predictor.window_pooling
    return predictor

  @classmethod
  def _from_workdir(cls, workdir: str, step: int | str | None, member: int | str | None = None,
                    devices: Sequence[jax.Device] | None = None) -> "Predictor":
    checkpoint_lib.check_step(workdir, step)
    exp, params = runs.load_run(workdir, step=step, member=member,  # sweep: best (or mean)
                                devices=None if devices is None else list(devices))
    if exp.multitask:
      raise UserError(f"{workdir}: a multi-task run ({', '.join(t.name for t in exp.tasks)}); "
                      "export it (flaxbert-cls export --output=OUT) and predict with OUT/<task>")
    decisions = None if exp.task.is_regression else decisions_lib.load_for(exp, workdir)
    return cls(exp.model, params, exp.tokenizer, exp.label_names, _unlabelled(exp.task),
               int(exp.config.max_seq_length), tuple(exp.config.seq_buckets),
               int(exp.config.eval_batch_size), exp.batch_sharding, workdir, decisions,
               exp.layout,
               exp.config.window_pooling, baseline=_blended_baseline(decisions, workdir))

  @classmethod
  def _from_hf_dir(cls, directory: str, devices: Sequence[jax.Device] | None = None
                   ) -> "Predictor":
    hf_config = hf.load_config(directory)
    tokenizer = hf.load_tokenizer(directory, hf_config.vocab_size)
    is_regression = hf_config.problem_type == "regression" or hf_config.num_labels == 1
    label_names = None if is_regression else tuple(
        str(hf_config.id2label[i]) for i in range(hf_config.num_labels))
    model = model_lib.BertForSequenceClassification(hf.model_config(hf_config),
                                                    1 if is_regression else len(label_names))
    dummy = np.ones((1, 8), np.int32)
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, dummy, dummy)))
    num_members, members = getattr(hf_config, "ensemble_members", 0), []  # > 0: an ensemble
    for state in hf.member_states(hf.load_state_dict(directory), num_members):
      params, new, _ = hf.params_from_state_dict(state, shapes["params"], hf_config.model_type)
      if new:  # a bare encoder (or another task's head) would predict with random weights
        raise UserError(f"{directory}: no weights for {', '.join(new[:4])}; not a sequence-"
                        "classification model (export a run with `flaxbert-cls export`)")
      members.append(params)
    params = runs.Members(members) if num_members else members[0]
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
        file_columns=tuple(meta["file_columns"]) if meta.get("file_columns") else None,
        is_regression=is_regression, problem_type=hf_config.problem_type or (
            "regression" if is_regression else "single_label_classification"))
    decisions = None if is_regression else decisions_lib.Decisions.from_hf_config(
        hf_config, os.path.join(directory, "config.json"))
    batch_sharding = None
    devices = list(devices or jax.local_devices())
    if len(devices) > 1 or jax.process_count() > 1:
      # As evaluate does: the batch split over the devices, the weights on each.
      mesh = sharding_lib.create_mesh(("data",), (-1,), devices)
      batch_sharding = sharding_lib.batch_sharding(mesh)
      params = jax.device_put(params, sharding_lib.replicated(mesh))
    return cls(model, jax.device_put(params, None if batch_sharding else devices[0]), tokenizer, label_names, task,
               int(meta.get("max_seq_length", _DEFAULT_MAX_SEQ_LENGTH)),
               tuple(meta.get("seq_buckets", _DEFAULT_BUCKETS)), _DEFAULT_BATCH_SIZE,
               batch_sharding, directory, decisions, tokenization.Layout.from_export(meta),
               meta.get("window_pooling", "mean"),
               baseline=_blended_baseline(decisions, directory))

  @property
  def is_regression(self) -> bool:
    return self.label_names is None

  def predict(self, texts: Sequence[str] | Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """One result per text (or text pair), in order: {'label', 'probabilities'} or {'score'}."""
    rows = _normalize_texts(texts)
    logits = self.logits(self._tokenize(rows))
    return self._results(logits, rows)

  def _tokenize(self, rows: Sequence[tuple[str, ...]]) -> data_lib.TokenizedSplit:
    return tokenization.tokenize(self.tokenizer, rows, None, self.max_seq_length, self.layout)

  def logits(self, split: data_lib.TokenizedSplit, progress: bool = False,
             on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
    """float32 [n, num_labels] logits of every example (document) of `split`, in its order.

    `on_batch(done, total)` after each batch; `progress` without it: a bar on a terminal,
    else a log line every tenth of the batches.
    """
    if self._jit_eval is None:
      self._jit_eval = evaluate_lib.jit_eval_step(self.model, window_pooling=self.window_pooling)
    if on_batch is None and progress:
      on_batch = progress_lib.BatchProgress("predict", log_lines=True)
    if self.quantized is not None:  # ONNX Runtime on the host: no device batches
      return evaluate_lib.gather_logits(self.quantized, None, split, self.batch_size,
                                        self.seq_buckets, self.max_seq_length, None, on_batch)
    gather = lambda p: evaluate_lib.gather_logits(  # pylint: disable=unnecessary-lambda-assignment
        self._jit_eval, p, split, self.batch_size, self.seq_buckets, self.max_seq_length,
        self.batch_sharding, on_batch)
    if isinstance(self.params, runs.Members):  # the logits of the members' mean probability
      return ensemble_lib.ensemble_logits([gather(p) for p in self.params.params],
                                          self.task.is_multilabel, self.is_regression)
    return gather(self.params)

  def _results(self, logits: np.ndarray, texts: Sequence[tuple[str, ...]]
               ) -> list[dict[str, Any]]:
    if self.is_regression:
      return [{"score": float(s)} for s in logits[:, 0]]
    # Probabilities after the temperature (and blended with the baseline's); labels by the
    # thresholds (decisions/tuning.py).
    decisions = self.decisions or decisions_lib.Decisions()
    multilabel = self.task.is_multilabel
    probs = decisions.probabilities(logits, multilabel)
    if decisions.blend_weight is not None:
      probs = decisions.blended(probs, baseline_lib.model_probabilities(
          self.baseline, texts, len(self.label_names)))
    chosen = decisions.predictions(probs, multilabel)
    names = self.label_names
    # Multi-label: every label at or over its threshold, and every label's probability.
    return [{"label": ([n for n, c in zip(names, row) if c] if multilabel else names[int(row)]),
             "probabilities": {n: float(q) for n, q in zip(names, p)}}
            for row, p in zip(chosen, probs)]

  def predict_file(self, input_path: str, output_path: str,
                   chunk_rows: int = CHUNK_ROWS) -> dict[str, float]:
    """Predicts every row of a .tsv/.csv/.jsonl file; writes .csv or .jsonl in input order.

    Streams: `chunk_rows` rows at a time are read, tokenized, predicted (length-sorted
    batches within the chunk) and appended to the output, which appears whole at the end.
    Returns {'rows', 'seconds', 'examples_per_sec', 'sentences_per_sec' (the same),
    'wall_seconds'}; 'seconds' counts tokenization and model, not file I/O.
    """
    ext = os.path.splitext(output_path)[1].lower()
    if ext not in OUTPUT_EXTENSIONS:  # before any work
      raise UserError(f"--output={output_path}: unknown file type {ext!r}; use one of "
                      f"{list(OUTPUT_EXTENSIONS)}")
    if chunk_rows < 1:
      raise UserError(f"chunk_rows={chunk_rows}: must be >= 1")
    total = _count_lines(input_path)  # rows (+ a header): the ETA's total
    log.info("predict: %s (%d lines) with %s%s, %d rows at a time", input_path, total,
             self.source, " (int8)" if self.quantized is not None else "", chunk_rows)
    wall_start = time.perf_counter()
    rows, seconds, truncated = 0, 0.0, 0
    progress = progress_lib.RowProgress("predict", total)
    try:
      with _ResultWriter(output_path, self.task.text_fields, self.label_names) as writer:
        for examples in streaming.read_file_chunks(input_path, self.task, chunk_rows):
          start = time.perf_counter()
          split = self._tokenize(examples.texts)
          done_before = rows
          logits = self.logits(split, on_batch=lambda done, _: progress.update(
              done_before + min(done * self.batch_size, len(examples))))
          seconds += time.perf_counter() - start
          writer.write(examples.texts, self._results(logits, examples.texts))
          rows += len(examples)
          truncated += split.num_truncated
          progress.update(rows)
    finally:
      progress.close()
    stats = {"rows": rows, "seconds": seconds, "examples_per_sec": rows / max(seconds, 1e-9),
             "wall_seconds": time.perf_counter() - wall_start}
    stats["sentences_per_sec"] = stats["examples_per_sec"]
    log.info("predict: wrote %s: %d rows in %.2f s, %.1f examples/s (tokenization and model; "
             "a first call also compiles; %.1f s in all). %d rows truncated to %d tokens.",
             output_path, rows, seconds, stats["examples_per_sec"], stats["wall_seconds"],
             truncated, self.max_seq_length)
    return stats


def _blended_baseline(decisions: decisions_lib.Decisions | None, path: str) -> Any:
  """The baseline a model's decisions blend with (baseline_model.joblib beside it), or None."""
  if decisions is None or decisions.blend_weight is None:
    return None
  model = baseline_lib.load_model(path)
  if model is None:
    raise UserError(f"{path}: its decisions blend the baseline (blend_weight="
                    f"{decisions.blend_weight}) but {baseline_lib.MODEL_FILE} is missing")
  return model


def predict_file(model: str, input_path: str, output_path: str, step: int | str | None = None,
                 text_fields: Sequence[str] | None = None, quantize: str | None = None,
                 batch_size: int | None = None, member: int | str | None = None,
                 chunk_rows: int = CHUNK_ROWS) -> dict[str, float]:
  """`flaxbert-cls predict`: Predictor.from_path(model).predict_file(input, output)."""
  predictor = Predictor.from_path(model, step=step, text_fields=text_fields,
                                  batch_size=batch_size, quantize=quantize, member=member)
  return predictor.predict_file(input_path, output_path, chunk_rows)


def _count_lines(path: str) -> int:
  """Newlines in the file (a streamed pass over its bytes; 1M lines take well under a second)."""
  if not files.exists(path) or files.is_dir(path):
    return 0  # the reader says what is wrong
  count, last = 0, b"\n"
  with files.open_binary(path) as f:
    while block := f.read(1 << 20):
      count += block.count(b"\n")
      last = block[-1:]
  return count + (last != b"\n")


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


class _ResultWriter:
  """CSV: text columns, label, p_<label>... (or score); JSONL: the same as objects.

  Rows are appended as they come to a temporary file, renamed to `path` on success: a
  reader never sees half a file, and a failed run leaves none.
  """

  def __init__(self, path: str, text_fields: Sequence[str],
               label_names: tuple[str, ...] | None):
    self.path, self.text_fields, self.label_names = path, tuple(text_fields), label_names
    self._tmp = f"{path}.tmp-{os.getpid()}"
    self._file = None

  def __enter__(self) -> "_ResultWriter":
    try:
      self._file = open(self._tmp, "w", newline="", encoding="utf-8")
    except OSError as e:
      raise UserError(f"--output={self.path}: cannot write: {e}") from None
    self._file.write(output_format.header_text(self.path, self.text_fields, self.label_names))
    return self

  def write(self, texts: Sequence[tuple[str, ...]], results: list[dict[str, Any]]) -> None:
    try:
      self._file.write(output_format.results_text(self.path, self.text_fields, self.label_names, texts,
                                    results))
    except OSError as e:
      raise UserError(f"--output={self.path}: cannot write: {e}") from None

  def __exit__(self, exc_type, exc, tb) -> None:
    self._file.close()
    try:
      if exc_type is None:
        os.replace(self._tmp, self.path)
    except OSError as e:
      raise UserError(f"--output={self.path}: cannot write: {e}") from None
    finally:
      if os.path.exists(self._tmp):
        os.remove(self._tmp)
