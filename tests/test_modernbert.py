"""ModernBERT in Flax against transformers' PyTorch ModernBertForSequenceClassification.

No pre-trained ModernBERT is reachable offline: a small random one (local and global layers,
a sequence longer than the local window, padding in the batch) is saved with
`save_pretrained`, read through hf.py like any checkpoint, and compared: hidden states,
logits and gradients, [CLS] and mean pooling.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxbert_cls.errors import UserError
from flaxbert_cls.model import bert as model_lib
from flaxbert_cls.model import hf
from flaxbert_cls.model import modernbert
from numerics import assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LENGTHS = (40, 23, 5)  # the longest spans 2.5 local windows (local_attention 16: +-8 keys)
LENGTH = 40


def _config(**overrides):
  values = dict(vocab_size=120, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                num_hidden_layers=4, global_attn_every_n_layers=3, local_attention=16,
                max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                cls_token_id=1, sep_token_id=2, num_labels=3)
  values.update(overrides)
  return transformers.ModernBertConfig(**values)


def _checkpoint(directory, **overrides):
  torch.manual_seed(0)
  model = transformers.ModernBertForSequenceClassification(_config(**overrides)).eval()
  model.save_pretrained(directory)
  return str(directory), model


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 120, size=(len(LENGTHS), LENGTH))
  mask = (np.arange(LENGTH)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
  return np.where(mask == 1, ids, 0), mask


def _flax(directory, pooling=None):
  hf_config = hf.load_config(directory)
  overrides = {} if pooling is None else {"pooling": pooling}
  cfg = hf.model_config(hf_config, **overrides)
  model = model_lib.BertForSequenceClassification(cfg, hf_config.num_labels)
  dummy = np.ones((1, 8), np.int32)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, dummy)))
  params, new, unused = hf.params_from_state_dict(hf.load_state_dict(directory),
                                                  shapes["params"], hf_config.model_type)
  return model, params, new, unused


# cls pooling runs the last layer on [CLS] only: a global last layer (4 layers), a local one (3).
@pytest.mark.parametrize("pooling,layers", [("cls", 4), ("mean", 4), ("cls", 3)])
def test_modernbert_equals_pytorch_hidden_states_logits_and_gradients(tmp_path, pooling, layers):
  directory, torch_model = _checkpoint(tmp_path / "ckpt", classifier_pooling=pooling,
                                       num_hidden_layers=layers)
  model, params, new, unused = _flax(directory)
  assert (new, unused) == ([], []), (new, unused)
  assert model.config.layer_types == ("full_attention", "sliding_attention",
                                      "sliding_attention", "full_attention")[:layers]
  assert model.config.pooling == pooling and not model.config.norm_bias
  ids, mask = _inputs()
  weights = np.arange(3.0)

  out = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    output_hidden_states=True)
  (out.logits * torch.tensor(weights, dtype=torch.float32)).sum().backward()
  want_logits = out.logits.detach().numpy()
  want_hidden = torch_model.model(input_ids=torch.tensor(ids),
                                  attention_mask=torch.tensor(mask)).last_hidden_state
  hidden = modernbert.ModernBertModel(model.config).apply(
      {"params": params["bert"]}, jnp.asarray(ids), jnp.asarray(mask))
  real = mask.astype(bool)  # padded positions are never read
  assert_close(np.asarray(hidden)[real], want_hidden.detach().numpy()[real], 1e-4, "hidden")
  first = modernbert.ModernBertModel(model.config, first_token_only=True).apply(
      {"params": params["bert"]}, jnp.asarray(ids), jnp.asarray(mask))
  assert first.shape == (len(LENGTHS), 1, 64)  # what cls pooling's logits below come from
  assert_close(first, want_hidden.detach().numpy()[:, :1], 1e-4, "[CLS]-only last layer")

  def loss(p):
    logits = model.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask))
    return jnp.sum(logits * weights), logits

  (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  assert_close(logits, want_logits, 1e-4, "logits")
  torch_grads = {k: v.grad.numpy() for k, v in torch_model.named_parameters()}
  flax_grads = hf.state_dict_from_params(grads, "modernbert")
  assert set(flax_grads) == set(torch_grads)
  scale = max(float(np.abs(g).max()) for g in torch_grads.values())
  for name, g in flax_grads.items():
    assert_close(g, torch_grads[name], 1e-3, name, floor=scale * 1e-2)


def test_the_state_dict_round_trips_and_an_encoder_alone_loads(tmp_path):
  directory, torch_model = _checkpoint(tmp_path / "ckpt")
  _, params, _, _ = _flax(directory)
  state = hf.state_dict_from_params(params, "modernbert")
  for name, value in torch_model.state_dict().items():
    np.testing.assert_array_equal(state[name], value.numpy(), err_msg=name)
  torch_model.model.save_pretrained(tmp_path / "encoder")  # a bare ModernBertModel
  hf_config = hf.load_config(directory)
  cfg = hf.model_config(hf.load_config(str(tmp_path / "encoder")))
  model = model_lib.BertForSequenceClassification(cfg, 2)
  dummy = np.ones((1, 8), np.int32)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, dummy)))
  loaded, new, unused = hf.params_from_state_dict(
      hf.load_state_dict(str(tmp_path / "encoder")), shapes["params"], hf_config.model_type)
  assert sorted(new) == ["classifier/bias", "classifier/kernel", "head/dense/kernel",
                         "head/norm/scale"] and unused == []
  np.testing.assert_array_equal(loaded["bert"]["layers"]["3"]["mlp"]["Wi"]["kernel"],
                                params["bert"]["layers"]["3"]["mlp"]["Wi"]["kernel"])


def test_features_not_implemented_are_refused_by_key(tmp_path):
  for overrides, key in ((dict(attention_dropout=0.1), "attention_dropout"),
                         (dict(hidden_activation="gelu_fast"), "hidden_activation"),
                         (dict(rope_parameters={"full_attention": {
                             "rope_type": "linear", "factor": 2.0, "rope_theta": 160000.0},
                                                "sliding_attention": {
                             "rope_type": "default", "rope_theta": 10000.0}}), "rope_type")):
    directory = tmp_path / key
    _config(**overrides).save_pretrained(directory)
    with pytest.raises(UserError, match=key) as e:
      hf.model_config(hf.load_config(str(directory)))
    assert "\n" not in str(e.value) and "config.json" in str(e.value)


def test_remat_and_bfloat16_keep_a_modernbert_runnable(tmp_path):
  directory, _ = _checkpoint(tmp_path / "ckpt")
  model, params, _, _ = _flax(directory)
  ids, mask = _inputs()
  want = model.apply({"params": params}, ids, mask)
  remat = model.clone(config=dataclasses.replace(model.config, remat_policy="full"))
  grads = jax.grad(lambda p: jnp.sum(remat.apply({"params": p}, ids, mask)))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert_close(remat.apply({"params": params}, ids, mask), want, 1e-6, "remat")
  bf16 = model.clone(config=dataclasses.replace(model.config, dtype="bfloat16"))
  assert_close(bf16.apply({"params": params}, ids, mask), want, 5e-2, "bfloat16")


def test_the_cls_only_last_layer_drops_what_the_full_layer_drops(tmp_path):
  """Training with mlp_dropout: the [CLS]-only last layer's masks are the full layer's first
  rows, so cls pooling sees the same values either way."""
  directory, _ = _checkpoint(tmp_path / "ckpt", mlp_dropout=0.3, embedding_dropout=0.1)
  model, params, _, _ = _flax(directory)
  ids, mask = _inputs()
  run = lambda first, deterministic: modernbert.ModernBertModel(
      model.config, first_token_only=first).apply(
          {"params": params["bert"]}, ids, mask, deterministic=deterministic,
          rngs={"dropout": jax.random.key(3)})
  full = np.asarray(run(False, False))
  assert_close(run(True, False), full[:, :1], 1e-5, "[CLS] under dropout")
  assert np.abs(full - np.asarray(run(False, True))).max() > 1e-2  # the masks did drop


def test_a_tiny_modernbert_fine_tunes_exports_and_reloads_in_transformers(tmp_path):
  """Through the CLI with the MiniLM's tokenizer (same vocabulary); the export loads in
  ModernBertForSequenceClassification without remote code, mean pooling from its config."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from conftest import run_cli  # pylint: disable=g-import-not-at-top
  from model_fixtures import DEMO_DATA, minilm_dir  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.serving import predict  # pylint: disable=g-import-not-at-top
  directory, _ = _checkpoint(tmp_path / "ckpt", vocab_size=30522, pad_token_id=0,
                             cls_token_id=101, sep_token_id=102, bos_token_id=101,
                             eos_token_id=102, num_labels=2)
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(os.path.join(minilm_dir(), name), directory)
  workdir = str(tmp_path / "run")
  args = [f"--config.{k}={v}" for k, v in (
      ("model_name_or_path", directory), ("train_file", os.path.join(DEMO_DATA, "train.tsv")),
      ("validation_file", os.path.join(DEMO_DATA, "dev.tsv")), ("pooling", "mean"),
      ("num_train_steps", 12), ("learning_rate", 3e-4), ("max_seq_length", 64),
      ("seq_buckets", "(64,)"), ("batch_size", 32), ("baseline", "none"),
      ("log_every_steps", 1))]
  code, _, err = run_cli("train", f"--config={os.path.dirname(__file__)}/../configs/default.py",
                         f"--workdir={workdir}", *args)
  assert code == 0, err[-2000:]
  losses = [json.loads(line)["loss"] for line in open(os.path.join(workdir,
                                                                         "train_log.jsonl"))]
  assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
  out = str(tmp_path / "exported")
  code, _, err = run_cli("export", f"--workdir={workdir}", f"--output={out}")
  assert code == 0, err[-2000:]
  exported = json.load(open(os.path.join(out, "config.json")))
  assert exported["model_type"] == "modernbert" and exported["classifier_pooling"] == "mean"
  assert "auto_map" not in exported
  model, info = transformers.ModernBertForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  texts = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate",
           "it 's a charming and often affecting journey ."]
  enc = tokenizer(texts, padding=True, return_tensors="pt")
  enc.pop("token_type_ids", None)
  with torch.no_grad():
    torch_logits = model.eval()(**enc).logits.numpy()
  for path in (workdir, out):
    predictor = predict.Predictor.from_path(path)
    assert_close(predictor.logits(predictor._tokenize([(t,) for t in texts])), torch_logits,
                 1e-4, path)
  # ONNX (dynamic batch and length) and int8 from the same run.
  ort = pytest.importorskip("onnxruntime")
  from flaxbert_cls.serving import export  # pylint: disable=g-import-not-at-top
  onnx_dir = export.export(workdir, str(tmp_path / "onnx"), export_format="onnx",
                           quantize="int8")
  session = ort.InferenceSession(os.path.join(onnx_dir, "model.onnx"),
                                 providers=["CPUExecutionProvider"])
  assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
  for batch in (texts, texts[1:]):
    enc = tokenizer(batch, padding=True, return_tensors="np")
    got = session.run(None, {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    with torch.no_grad():
      want = model(**{k: torch.tensor(enc[k]) for k in ("input_ids", "attention_mask")}).logits
    assert_close(got[0], want.numpy(), 1e-4, f"onnx, batch {len(batch)}")
  int8 = predict.Predictor.from_path(onnx_dir, quantize="int8")
  split = int8._tokenize([(t,) for t in texts])
  assert_close(int8.logits(split), torch_logits, 0.1, "int8")
