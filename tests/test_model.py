"""The Flax encoder equals transformers' PyTorch BertModel on the pre-trained MiniLM."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from flaxbert_cls.model import hf
from flaxbert_cls.model import bert as model_lib
from model_fixtures import minilm_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minilm():
  directory = minilm_dir()
  hf_config = hf.load_config(directory)
  tokenizer = hf.load_tokenizer(directory, hf_config.vocab_size)
  module = model_lib.BertForSequenceClassification(model_lib.BertConfig.from_hf(hf_config), 2)
  dummy = np.ones((1, 4), np.int32)
  abstract = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), dummy, dummy)))
  params, new, unused = hf.params_from_state_dict(hf.load_state_dict(directory),
                                                  abstract["params"])
  return directory, tokenizer, hf_config, params, new, unused


def test_checkpoint_maps_one_to_one(minilm):
  *_, new, unused = minilm
  assert sorted(new) == ["classifier/bias", "classifier/kernel"]  # only the fresh head
  assert unused == []


def test_encoder_matches_pytorch_on_padded_pairs(minilm):
  directory, tokenizer, hf_config, params, *_ = minilm
  first = ["a gripping , beautifully shot film .", "dull", "it 's not bad at all , really"]
  second = ["is the film good ?", "was it fun for the whole family ?", "yes"]
  enc = tokenizer(first, second, padding=True, return_tensors="np")
  assert enc["attention_mask"].min() == 0 and enc["token_type_ids"].max() == 1
  bert = model_lib.BertModel(model_lib.BertConfig.from_hf(hf_config))
  hidden, pooled = bert.apply({"params": params["bert"]}, enc["input_ids"],
                              enc["attention_mask"], enc["token_type_ids"])
  reference = transformers.BertModel.from_pretrained(directory).eval()
  with torch.no_grad():
    out = reference(**{k: torch.from_numpy(v) for k, v in enc.items()})
  assert np.abs(np.asarray(hidden) - out.last_hidden_state.numpy()).max() < 1e-4
  assert np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max() < 1e-4


def test_state_dict_round_trip_is_exact(minilm):
  *_, params, _, _ = minilm
  params = {"bert": params["bert"]}  # the head is not loaded: only shapes
  state = hf.state_dict_from_params(params)
  again, new, unused = hf.params_from_state_dict(state, params)
  assert new == [] and unused == []
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), b)
