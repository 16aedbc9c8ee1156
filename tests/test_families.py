"""BERT, RoBERTa, DistilBERT, ELECTRA (and XLM-R): PyTorch checkpoints in, PyTorch models out.

Each family is a small random PyTorch model made by transformers. Our Flax
encoder must equal it, and a model loaded into Flax, given a classification head
and exported, must give PyTorch's AutoModelForSequenceClassification the same
logits. The MiniLM BERT tokenizer serves every family: only token ids matter.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

from flaxbert_cls.serving import export
from flaxbert_cls.model import hf
from flaxbert_cls.model import bert as model_lib
from flaxbert_cls.errors import UserError
from family_fixtures import FAMILIES, LABELS, hf_checkpoint, hf_inputs, torch_kwargs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

def _load_flax(directory):
  """Our model from an HF directory; parameters it lacks (the head) are random."""
  hf_config = hf.load_config(directory)
  cfg = hf.model_config(hf_config)
  module = model_lib.BertForSequenceClassification(cfg, len(LABELS))
  dummy = np.ones((1, 8), np.int32)
  shapes = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), dummy, dummy, dummy)))
  params, new, unused = hf.params_from_state_dict(hf.load_state_dict(directory),
                                                  shapes["params"], hf_config.model_type)
  rng = np.random.default_rng(0)  # not module.init: one compile less per family
  params = jax.tree.map(lambda x: x if isinstance(x, np.ndarray) else
                        rng.normal(0, 0.2, x.shape).astype(np.float32), params)
  return hf_config, cfg, module, params, new, unused


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_encoder_and_export_match_pytorch(model_type, tokenizer_files, tmp_path):
  base = hf_checkpoint(model_type, str(tmp_path / "ckpt"), tokenizer_files)
  hf_config, cfg, module, params, new, unused = _load_flax(str(tmp_path / "ckpt"))
  assert hf_config.model_type == model_type
  # Only the head is new; only RoBERTa's pooler (unused by its classifier) is left over.
  assert new and all(p.startswith(("classifier/", "pre_classifier/")) for p in new), new
  assert all(k.startswith("pooler.") for k in unused), unused
  tokenizer = hf.load_tokenizer(str(tmp_path / "ckpt"), hf_config.vocab_size)

  # 1. The encoder: last hidden state on padded sentence pairs (token types 0 and 1).
  encoder = model_lib.BertModel(cfg, add_pooling_layer=cfg.classifier_head == "bert")
  encode = jax.jit(lambda ids, mask, types: encoder.apply({"params": params["bert"]}, ids, mask,
                                                          types)[0])
  enc = hf_inputs(tokenizer, hf_config)
  hidden = encode(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
  with torch.no_grad():
    expected = base(**torch_kwargs(enc, model_type)).last_hidden_state.numpy()
  real = enc["attention_mask"].astype(bool)
  assert not real.all()
  np.testing.assert_allclose(np.asarray(hidden)[real], expected[real], atol=1e-4, rtol=0)
  # Our batches pad with id 0 whatever the pad id is: real tokens must not notice.
  zero_padded = np.where(real, enc["input_ids"], 0)
  hidden0 = encode(zero_padded, enc["attention_mask"], enc["token_type_ids"])
  np.testing.assert_allclose(np.asarray(hidden0)[real], np.asarray(hidden)[real], atol=1e-6)

  # 2. Fine-tune-free round trip: loaded encoder + a random head -> export -> PyTorch.
  out = export.save_hf_model(str(tmp_path / "exported"), params, hf_config, tokenizer, LABELS)
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert type(model).__name__ == hf.FAMILIES[model_type].architecture
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert model.config.id2label == dict(enumerate(LABELS))
  assert transformers.AutoTokenizer.from_pretrained(out)("dull")["input_ids"] == \
      tokenizer("dull")["input_ids"]
  flax_logits = np.asarray(jax.jit(module.apply)({"params": params}, enc["input_ids"],
                                                 enc["attention_mask"], enc["token_type_ids"]))
  with torch.no_grad():
    torch_logits = model.eval()(**torch_kwargs(enc, model_type)).logits.numpy()
  assert np.abs(flax_logits).max() > 1e-3  # the head is not trivially zero
  np.testing.assert_allclose(flax_logits, torch_logits, atol=1e-4, rtol=0)
  # And back: the exported directory loads into Flax bit for bit, head included.
  *_, again, new, unused = _load_flax(out)
  assert new == [] and unused == []
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_unsupported_model_type_names_the_file(tmp_path):
  config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4)
  config.save_pretrained(str(tmp_path))
  with pytest.raises(UserError, match=r"config.json: model_type 'gpt2' is not supported"):
    hf.model_config(hf.load_config(str(tmp_path)))
