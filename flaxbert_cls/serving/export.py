"""Export a run's checkpoint as a Hugging Face model directory for PyTorch users.

  flaxbert-cls export --workdir=DIR --output=OUT [--step=latest|best|N] [--quantize=int8]
      [--format=hf|onnx]

OUT holds config.json (architectures, id2label/label2id, problem_type),
model.safetensors (float32, written from NumPy: no torch needed) and the
tokenizer files, so `AutoModelForSequenceClassification.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)` load it with no missing or unexpected keys.
It also holds flaxbert_cls.json (text columns, max_seq_length, ...), which
`predict` reads to tokenize as the run did; transformers ignores it.

A multi-task run (config.tasks) exports one such directory per task, OUT/<task>/:
the shared encoder with that task's head, named as a single-task model's.
`quantize='int8'` also writes OUT/model.int8.onnx for CPU serving (`quantize.py`);
`export_format='onnx'` also writes OUT/model.onnx, float, calibrated (`onnx_export.py`).
A mean-pooled run's directory names its modeling file (`remote_code.py`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Sequence

import jax
import numpy as np

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.data import tokenization
from flaxbert_cls.decisions import baseline as baseline_lib
from flaxbert_cls.decisions import tuning as decisions_lib
from flaxbert_cls.errors import UserError
from flaxbert_cls.model import bert as model_lib
from flaxbert_cls.model import hf
from flaxbert_cls.serving import onnx_export
from flaxbert_cls.serving import quantize as quantize_lib
from flaxbert_cls.serving import remote_code
from flaxbert_cls.training import checkpoints as checkpoint_lib
from flaxbert_cls.training import runs

log = logging.getLogger(__name__)

METADATA_NAME = "flaxbert_cls.json"


def hf_config_for_export(hf_config: Any, label_names: Sequence[str] | None,
                         problem_type: str = "single_label_classification") -> Any:
  """A copy of `hf_config` for a *ForSequenceClassification with this label map.

  `label_names` None means regression (one output). `problem_type` picks transformers'
  loss: 'multi_label_classification' = BCEWithLogitsLoss (apply a sigmoid to the logits).
  """
  fam = hf.family(hf_config.model_type)
  config = copy.deepcopy(hf_config)
  # A run started from an export: its decisions and remote-code keys are not this run's.
  for stale in (decisions_lib.HF_TEMPERATURE, "threshold", "thresholds", "blend_weight",
                "auto_map"):
    if stale in vars(config):
      delattr(config, stale)
  config.architectures = [fam.architecture]
  if label_names is None:
    config.num_labels = 1
    config.problem_type = "regression"
  else:
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    config.problem_type = problem_type
  # The weights are float32; a pre-trained config saying bfloat16 would make
  # transformers (dtype='auto') load them rounded.
  config.dtype = "float32"
  return config


def save_hf_model(output: str, params: Any, hf_config: Any, tokenizer: Any,
                  label_names: Sequence[str] | None,
                  metadata: dict[str, Any] | None = None,
                  problem_type: str = "single_label_classification",
                  decision_fields: dict[str, Any] | None = None, pooling: str = "cls") -> str:
  """Writes an HF model directory (config, safetensors, tokenizer) to a new `output`.

  `params` are the Flax classification model's parameters (any arrays); they are
  written under the names of `hf_config.model_type`'s family (`runs.Members`: each member's
  under members.<i>., an ensemble the modeling file loads; remote_code.py). `decision_fields`
  (temperature, threshold(s): decisions/tuning.py; the run's pooling and window keys) go into
  config.json; pooling='mean' points it at the modeling file (remote_code.py). The directory
  appears whole or not at all: files go to a temporary sibling that is renamed.
  """
  output = os.path.abspath(output)
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise UserError(f"--output={output}: exists and is not an empty directory; choose a new one")
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  members = params.params if isinstance(params, runs.Members) else [params]
  states = [hf.state_dict_from_params(jax.tree.map(np.asarray, jax.device_get(p)),
                                      hf_config.model_type) for p in members]
  state = states[0] if not isinstance(params, runs.Members) else {
      f"{hf.ENSEMBLE_PREFIX}{i}.{name}": value
      for i, member in enumerate(states) for name, value in member.items()}
  tmp = f"{output}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
    config = hf_config_for_export(hf_config, label_names, problem_type)
    native_mean = hf.family(hf_config.model_type).native_mean  # its class pools by config
    if native_mean:
      config.classifier_pooling = pooling
    for key, value in (decision_fields or {}).items():  # kept by PretrainedConfig as extras
      setattr(config, key, value)
    config.save_pretrained(tmp)
    # "format": "pt" is what transformers writes; readers use it to pick a framework.
    save_file(state, os.path.join(tmp, hf.SAFETENSORS_NAME), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    remote_code.write(tmp, hf_config.model_type, "cls" if native_mean else pooling,
                      len(members) if isinstance(params, runs.Members) else 0)
    if metadata is not None:
      with open(os.path.join(tmp, METADATA_NAME), "w") as f:
        json.dump(metadata, f, indent=2)
    if os.path.isdir(output):
      os.rmdir(output)  # empty (checked above)
    os.replace(tmp, output)
  except OSError as e:
    raise UserError(f"--output={output}: cannot write: {e}") from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return output


def export(workdir: str, output: str, step: int | str | None = None,
           quantize: str | None = None, member: int | str | None = None,
           export_format: str = "hf") -> str:
  """Exports the run in `workdir` (checkpoint `step`: latest, 'best' or N) to `output`.

  `quantize='int8'`: each exported directory also gets model.int8.onnx; `export_format=
  'onnx'`: model.onnx. A sweep exports one `member` (default: the best; sweep.member_index).
  """
  step = checkpoint_lib.parse_step(step)
  onnx_export.check_format(export_format)
  if quantize:
    quantize_lib.check_mode(quantize)
    quantize_lib.require_onnxruntime()  # before the export's work
  if (quantize or export_format != "hf") and member == runs.MEAN:
    raise UserError(f"--member={runs.MEAN}: an ensemble exports as PyTorch weights only; "
                    "drop --quantize / --format=onnx, or export one member")
  if quantize or export_format != "hf":
    out = export(workdir, output, step, member=member)
    for directory in [out] if os.path.isfile(os.path.join(out, "config.json")) else [
        os.path.join(out, d) for d in sorted(os.listdir(out))]:
      if export_format == "onnx":
        onnx_export.write_float(directory)
      if quantize:
        quantize_lib.write_int8(directory)
    return out
  checkpoint_lib.check_step(workdir, step)
  exp, params = runs.load_run(workdir, step=step, member=member)
  if exp.multitask and isinstance(params, runs.Members):
    raise UserError(f"--member={runs.MEAN}: {workdir} is a multi-task sweep; export one member")
  if not exp.multitask:
    return _export_head(exp, exp.tasks[0], params, workdir, output, step)
  output = os.path.abspath(output)
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise UserError(f"--output={output}: exists and is not an empty directory; choose a new one")
  for run_task in exp.tasks:
    _export_head(exp, run_task, model_lib.task_params(params, run_task.name), workdir,
                 os.path.join(output, run_task.name), step)
  return output


def _export_head(exp: Any, run_task: Any, params: Any, workdir: str, output: str,
                 step: int | str | None) -> str:
  """One task's HF directory; `params` named as a one-task model's."""
  task = run_task.task
  remote_code.check_run_settings(exp.config, workdir)
  pooling = exp.config.pooling
  metadata = {
      "source_workdir": os.path.abspath(workdir),
      "step": "latest" if step is None else step,
      "task_name": task.name,
      "text_fields": list(task.text_fields),
      "file_columns": list(task.file_columns) if task.file_columns else None,
      "max_seq_length": int(exp.config.max_seq_length),
      "seq_buckets": [int(b) for b in exp.config.seq_buckets],
      "pooling": pooling,
  }
  if exp.member == runs.MEAN:  # every member, averaged
    metadata.update(member=exp.member, member_values=list(exp.members))
  elif exp.member is not None:  # a sweep member: which one, and its values
    metadata.update(member=exp.member, member_values=exp.members[exp.member])
  started = workdir_lib.join(workdir, workdir_lib.STARTED_FROM_NAME)
  if workdir_lib.exists(started):  # a re-fine-tuned run's lineage travels with its export
    metadata["started_from"] = json.loads(workdir_lib.read_text(started))
  # predict reads long documents as the run did (head_tail / windows + pooling).
  metadata.update({k: exp.config[k] for k in (*tokenization.LONG_DOCUMENT_KEYS, "window_pooling")
                   if k in exp.config})
  decisions = None if exp.multitask or task.is_regression else decisions_lib.load_for(
      exp, workdir)
  # Every classifier's config.json has a temperature (1.0: uncalibrated), so users' code is one.
  fields = remote_code.run_fields(exp.config) | (
      decisions.hf_fields() if decisions else
      {} if task.is_regression else {decisions_lib.HF_TEMPERATURE: 1.0})
  out = save_hf_model(output, params, exp.hf_config, exp.tokenizer, run_task.label_names, metadata,
                      task.problem_type, fields, pooling)
  log.info("Exported %s (step %s, %s, %s, %d labels) to %s", workdir, metadata["step"],
           task.name, hf.family(exp.hf_config.model_type).architecture,
           1 if run_task.label_names is None else len(run_task.label_names), out)
  if decisions is not None and decisions.blend_weight is not None:
    model = workdir_lib.read_bytes(workdir_lib.join(workdir, baseline_lib.MODEL_FILE))
    workdir_lib.write_bytes(os.path.join(out, baseline_lib.MODEL_FILE), model)
    log.info("The run blends its baseline: %s is its scikit-learn pipeline (joblib.load; "
             "predict_proba of the texts); probabilities = %.2f x the model's + %.2f x the "
             "pipeline's (config.json blend_weight; predict on %s does this)",
             os.path.join(out, baseline_lib.MODEL_FILE), decisions.blend_weight,
             1 - decisions.blend_weight, out)
  return out


def load_int8(path: str, is_workdir: bool, step: int | str | None = None,
              member: int | str | None = None) -> quantize_lib.OnnxClassifier:
  """The int8 model of an exported directory (its model.int8.onnx, else made now) or of a
  workdir's checkpoint `step` (and sweep `member`), exported and quantized now in a
  temporary directory."""
  if not is_workdir and os.path.isfile(os.path.join(path, quantize_lib.INT8_NAME)):
    return quantize_lib.OnnxClassifier(os.path.join(path, quantize_lib.INT8_NAME))
  quantize_lib.require_onnxruntime()  # the one-line error before any export work
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = path
    if is_workdir:
      hf_dir = export(path, os.path.join(tmp, "hf"), step, member=member)
    log.info("%s has no %s: quantizing now (export --quantize=int8 writes it once)", path,
             quantize_lib.INT8_NAME)
    # The session holds the model in memory: the temporary files can go.
    int8_path = quantize_lib.write_int8(hf_dir, os.path.join(tmp, quantize_lib.INT8_NAME))
    return quantize_lib.OnnxClassifier(int8_path)
