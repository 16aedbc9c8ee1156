"""Mean-pooled and long-document exports: transformers' own classes with the run's pooling
(trust_remote_code), the same logits and probabilities as predict, score_document."""

import importlib.util
import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from flaxbert_cls.data import tokenization
from flaxbert_cls.errors import UserError
from flaxbert_cls.model import bert as model_lib
from flaxbert_cls.model import hf
from flaxbert_cls.serving import export
from flaxbert_cls.serving import predict
from flaxbert_cls.serving import remote_code
from flaxbert_cls.training import train
import export_fixtures
import family_fixtures
from model_fixtures import DEMO_DATA
from numerics import assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MAX_LEN = 32


def _documents(root):
  """SST-2 'documents' of 1 to 6 sentences (up to ~150 tokens: several windows of 32)."""
  lines = open(os.path.join(DEMO_DATA, "train.tsv")).read().splitlines()[1:161]
  rows = [line.split("\t") for line in lines]
  docs, start = [], 0
  for i in range(48):
    size = 1 + i % 6
    part = rows[start:start + size] or rows[:size]
    start += size
    docs.append({"text": " ".join(s for s, _ in part), "label": part[0][1]})
  path = os.path.join(root, "docs.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps(d) + "\n" for d in docs)
  return path, [d["text"] for d in docs]


@pytest.fixture(scope="module")
def mean_run(tmp_path_factory):
  """A tiny BERT, mean-pooled, reading documents in windows (max-pooled), trained 4 steps."""
  root = str(tmp_path_factory.mktemp("mean"))
  docs_file, texts = _documents(root)
  config = export_fixtures.tiny_run_config(
      export_fixtures.tiny_bert(os.path.join(root, "tiny")), task_name="custom",
      train_file=docs_file, validation_file=docs_file, text_columns=("text",), pooling="mean",
      max_seq_length=MAX_LEN, seq_buckets=(MAX_LEN,), long_document="windows",
      window_stride=16, max_windows=4, window_pooling="max", num_train_steps=4,
      learning_rate=1e-3, eval_batch_size=16, calibrate=True)
  workdir = os.path.join(root, "run")
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  exported = export.export(workdir, os.path.join(root, "exported"))
  return workdir, exported, texts


def test_mean_export_loads_with_remote_code_and_matches_predict(mean_run):
  workdir, exported, texts = mean_run
  config = json.load(open(os.path.join(exported, "config.json")))
  assert config["model_type"] == "flaxbert_cls_mean_bert"
  assert config["architectures"] == ["MeanPooledBertForSequenceClassification"]
  assert config["pooling"] == "mean" and config["window_pooling"] == "max"
  assert config["long_document"] == "windows" and config["max_windows"] == 4
  assert config["calibration_temperature"] > 0 and config["id2label"] == {"0": "0", "1": "1"}
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      exported, trust_remote_code=True, output_loading_info=True)
  assert isinstance(model, transformers.BertForSequenceClassification)
  assert type(model).__name__ == "MeanPooledBertForSequenceClassification"
  assert model.bert.pooler is None
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
  # One window per text: the plain forward is the run's model.
  short = [t for t in texts if len(tokenizer(t)["input_ids"]) <= MAX_LEN][:12]
  enc = tokenizer(short, padding=True, return_tensors="pt")
  with torch.no_grad():
    torch_logits = model.eval()(**enc).logits.numpy()
  want = predict.Predictor.from_path(workdir)
  flax_logits = want.logits(want._tokenize([(t,) for t in short]))
  assert flax_logits.std() > 0.02  # a head that tells inputs apart
  assert_close(torch_logits, flax_logits, 1e-4)
  # Whole documents, several windows each, scored by the shipped function.
  long_texts = [t for t in texts if len(tokenizer(t)["input_ids"]) > 2 * MAX_LEN][:6]
  assert len(long_texts) >= 3
  flax_docs = want.logits(want._tokenize([(t,) for t in long_texts]))
  scored = np.stack([model.score_document(tokenizer, t).numpy() for t in long_texts])
  assert_close(scored, flax_docs, 1e-4)
  # What a user does beside the directory: import the file, probabilities after temperature.
  sys.path.insert(0, exported)
  try:
    from modeling_flaxbert_cls import score_document  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(exported)
  probs = (score_document(model, tokenizer, long_texts[0]) /
           model.config.calibration_temperature).softmax(-1).numpy()
  got = predict.Predictor.from_path(exported).predict([long_texts[0]])[0]["probabilities"]
  assert_close(probs, np.array([got["0"], got["1"]]), 1e-4)


def test_mean_export_predicts_as_the_workdir(mean_run):
  workdir, exported, texts = mean_run
  from_export = predict.Predictor.from_path(exported)
  assert from_export.model.config.pooling == "mean" and from_export.window_pooling == "max"
  a = from_export.logits(from_export._tokenize([(t,) for t in texts]))
  w = predict.Predictor.from_path(workdir)
  assert_close(a, w.logits(w._tokenize([(t,) for t in texts])), 1e-5)


def test_mean_export_without_trust_remote_code_fails_loudly(mean_run):
  _, exported, _ = mean_run
  with pytest.raises(ValueError, match="trust_remote_code"):
    transformers.AutoModelForSequenceClassification.from_pretrained(exported)
  with pytest.raises(ValueError, match="trust_remote_code"):
    transformers.AutoConfig.from_pretrained(exported)


def test_every_family_has_its_mean_pooled_classes():
  path = os.path.join(os.path.dirname(remote_code.__file__), remote_code.MODELING_NAME)
  spec = importlib.util.spec_from_file_location("modeling_flaxbert_cls", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for model_type, fam in hf.FAMILIES.items():
    if fam.native_mean:  # ModernBERT: transformers' own class takes classifier_pooling
      continue
    config_name, model_name = remote_code.class_names(model_type)
    config_class, model_class = getattr(module, config_name), getattr(module, model_name)
    assert config_class.model_type == hf.mean_model_type(model_type)
    assert module.MEAN_MODEL_TYPES[model_type] == config_class.model_type
    assert hf.base_model_type(config_class.model_type) == model_type
    assert issubclass(model_class, getattr(transformers, fam.architecture))
    assert model_class.config_class is config_class


def test_unknown_pooling_or_layout_names_the_key():
  from flaxbert_cls.config import default_config  # pylint: disable=g-import-not-at-top
  c = default_config()
  c.pooling = "max"
  with pytest.raises(UserError, match=r"^wd: config.pooling='max' cannot be exported"):
    remote_code.check_run_settings(c, "wd")
  c.pooling, c.long_document = "mean", "chunks"
  with pytest.raises(UserError, match=r"config.long_document='chunks' cannot be exported"):
    remote_code.check_run_settings(c, "wd")


def test_float_onnx_is_predict_with_the_temperature(mean_run, tmp_path):
  ort = pytest.importorskip("onnxruntime")
  workdir, _, texts = mean_run
  out = export.export(workdir, str(tmp_path / "onnx"), export_format="onnx", quantize="int8")
  assert {"model.onnx", "model.int8.onnx", "config.json", "tokenizer.json",
          "modeling_flaxbert_cls.py"} <= set(os.listdir(out))
  session = ort.InferenceSession(os.path.join(out, "model.onnx"),
                                 providers=["CPUExecutionProvider"])
  assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask",
                                                    "token_type_ids"]
  assert session.get_inputs()[0].shape == ["batch", "sequence"]
  tokenizer = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
  # The graph scores rows (window pooling is the caller's): predict reading one row per text.
  rows = predict.Predictor.from_path(workdir)
  rows.layout = tokenization.TRUNCATE
  temperature = rows.decisions.temperature
  assert temperature != 1.0  # calibrated: the test sees the division
  for batch in (texts[:3], texts[5:16]):  # two batch sizes and lengths: dynamic axes
    enc = tokenizer(batch, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="np")
    logits = session.run(None, {k: v.astype(np.int64) for k, v in enc.items()})[0]
    want = rows.logits(rows._tokenize([(t,) for t in batch]))
    assert_close(logits, want / temperature, 1e-4)
  # --quantize=int8 beside it still serves the mean-pooled model (raw logits, int8 weights).
  int8 = predict.Predictor.from_path(out, quantize="int8")
  int8.layout = tokenization.TRUNCATE
  split = rows._tokenize([(t,) for t in texts])
  float_margin = np.diff(rows.logits(split), axis=-1)[:, 0]
  int8_margin = np.diff(int8.logits(split), axis=-1)[:, 0]
  assert np.corrcoef(float_margin, int8_margin)[0, 1] > 0.9


@pytest.mark.parametrize("model_type", list(family_fixtures.FAMILIES))
def test_every_family_exports_mean_pooled_with_equal_logits(model_type, tokenizer_files, tmp_path):
  """A random mean-pooled model of each family: Flax logits == the exported class's in PyTorch."""
  family_fixtures.hf_checkpoint(model_type, str(tmp_path / "ckpt"), tokenizer_files)
  hf_config = hf.load_config(str(tmp_path / "ckpt"))
  module = model_lib.BertForSequenceClassification(hf.model_config(hf_config, pooling="mean"),
                                                   len(family_fixtures.LABELS))
  dummy = np.ones((1, 8), np.int32)
  shapes = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), dummy, dummy, dummy)))
  params, new, _ = hf.params_from_state_dict(hf.load_state_dict(str(tmp_path / "ckpt")),
                                             shapes["params"], model_type)
  assert "bert/pooler/dense/kernel" not in traverse_util.flatten_dict(params, sep="/")
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x if isinstance(x, np.ndarray) else
                        rng.normal(0, 0.2, x.shape).astype(np.float32), params)
  tokenizer = hf.load_tokenizer(str(tmp_path / "ckpt"))
  out = export.save_hf_model(str(tmp_path / "exported"), params, hf_config, tokenizer,
                             family_fixtures.LABELS, pooling="mean")
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, trust_remote_code=True, output_loading_info=True)
  assert isinstance(model, getattr(transformers, hf.FAMILIES[model_type].architecture))
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  enc = family_fixtures.hf_inputs(tokenizer, hf_config)
  flax_logits = np.asarray(jax.jit(module.apply)({"params": params}, enc["input_ids"],
                                                 enc["attention_mask"], enc["token_type_ids"]))
  with torch.no_grad():
    torch_logits = model.eval()(**family_fixtures.torch_kwargs(enc, model_type)).logits.numpy()
  assert_close(torch_logits, flax_logits, 1e-4)
  # Read back without running its code: the family's config with pooling='mean'.
  again = hf.load_config(out)
  assert again.model_type == model_type and again.pooling == "mean"
  assert hf.model_config(again).pooling == "mean"


def test_a_run_started_from_an_export_does_not_inherit_its_decisions():
  config = transformers.BertConfig()
  config.calibration_temperature, config.thresholds = 2.0, [0.1, 0.2]
  exported = export.hf_config_for_export(config, ["a", "b"])
  assert not hasattr(exported, "calibration_temperature") and not hasattr(exported, "thresholds")
  assert config.calibration_temperature == 2.0  # the run's own config is untouched
