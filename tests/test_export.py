"""Export: a fine-tuned run -> an HF directory PyTorch loads and agrees with, and back."""

import json
import os

import jax
import numpy as np
import pytest

from flaxbert_cls.training import checkpoints
from flaxbert_cls.training import starts
from flaxbert_cls.training import experiment
from flaxbert_cls.serving import export
from flaxbert_cls.model import hf
from flaxbert_cls.errors import UserError
import export_fixtures
from numerics import assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run():
  return export_fixtures.trained_run()


def test_pytorch_logits_equal_flax_on_sst2_dev(run):
  sentences, flax_logits, out = run.sentences, run.logits, run.exported
  assert flax_logits.shape == (872, 2)
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert type(model).__name__ == "BertForSequenceClassification"
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["architectures"] == ["BertForSequenceClassification"]
  assert config["id2label"] == {"0": "0", "1": "1"} and config["label2id"] == {"0": 0, "1": 1}
  assert config["problem_type"] == "single_label_classification"
  # What a PyTorch user does: their tokenizer from the directory, their own batches.
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  torch_logits = []
  with torch.no_grad():
    for i in range(0, len(sentences), 128):
      enc = tokenizer(sentences[i:i + 128], padding=True, truncation=True, max_length=64,
                      return_tensors="pt")
      torch_logits.append(model.eval()(**enc).logits.numpy())
  torch_logits = np.concatenate(torch_logits)
  margin = flax_logits[:, 1] - flax_logits[:, 0]
  # A head that tells inputs apart (spread >> the 1e-4 tolerance) and predicts both classes.
  assert margin.std() > 0.02 and 0.01 < (margin > 0).mean() < 0.99, (margin.std(),
                                                                      (margin > 0).mean())
  assert np.abs(torch_logits - flax_logits).max() < 1e-4
  np.testing.assert_array_equal(torch_logits.argmax(-1), flax_logits.argmax(-1))


def test_exported_directory_imports_back_bit_for_bit(run):
  """The export as model_name_or_path of a new run: every parameter, head included, is equal."""
  exp, params, out = run.exp, run.params, run.exported
  config = export_fixtures.tiny_run_config(out)
  new_exp = experiment.build_experiment(config)
  assert new_exp.label_names == exp.label_names
  state, *_ = starts.create_train_state(new_exp, 10, hf.resolve(out))
  flat_new = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
  flat_old = jax.tree_util.tree_leaves_with_path(params)
  assert [p for p, _ in flat_new] == [p for p, _ in flat_old]
  for (path, a), (_, b) in zip(flat_new, flat_old):
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  _, new, unused = hf.params_from_state_dict(hf.load_state_dict(out), params)
  assert new == [] and unused == []


def test_export_errors_name_the_problem(run, tmp_path):
  workdir, out = run.workdir, run.exported
  with pytest.raises(UserError, match="exists and is not an empty directory"):
    export.export(workdir, out)
  with pytest.raises(UserError, match="--step='last'"):
    export.export(workdir, str(tmp_path / "x"), step="last")
  with pytest.raises(UserError, match=r"no checkpoint at step 7; saved steps: \[10\]"):
    export.export(workdir, str(tmp_path / "y"), step="7")
  assert not os.path.exists(tmp_path / "y")  # nothing half-written
  assert checkpoints.parse_step("latest") is None and checkpoints.parse_step("10") == 10


def test_float_onnx_of_a_cls_run_equals_flax_in_onnx_runtime(run, tmp_path):
  ort = pytest.importorskip("onnxruntime")
  out = export.export(run.workdir, str(tmp_path / "onnx"), export_format="onnx")
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["architectures"] == ["BertForSequenceClassification"]  # no remote code
  assert config["pooling"] == "cls" and config["max_seq_length"] == 64
  assert config["calibration_temperature"] == 1.0  # uncalibrated: still one formula for users
  session = ort.InferenceSession(os.path.join(out, "model.onnx"),
                                 providers=["CPUExecutionProvider"])
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  enc = tokenizer(run.sentences[:96], padding=True, truncation=True, max_length=64,
                  return_tensors="np")
  logits = session.run(None, {i.name: enc[i.name].astype(np.int64)
                              for i in session.get_inputs()})[0]
  assert_close(logits, run.logits[:96], 1e-4)  # temperature 1: an uncalibrated run
  with pytest.raises(UserError, match=r"--format=tflite: unknown; use one of \['hf', 'onnx'\]"):
    export.export(run.workdir, str(tmp_path / "x"), export_format="tflite")
