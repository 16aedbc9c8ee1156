"""The transformers encoder families as small random PyTorch models, and their inputs: what
tests/test_families.py and tests/test_export_mean.py compare the Flax encoder with."""

import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


_SIZES = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
FAMILIES = {
    "bert": lambda: transformers.BertConfig(hidden_size=32, max_position_embeddings=64, **_SIZES),
    # RoBERTa as published: one token type, pad id 1, positions from pad id + 1.
    "roberta": lambda: transformers.RobertaConfig(
        hidden_size=32, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
        layer_norm_eps=1e-5, **_SIZES),
    "xlm-roberta": lambda: transformers.XLMRobertaConfig(
        hidden_size=32, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
        layer_norm_eps=1e-5, **_SIZES),
    "distilbert": lambda: transformers.DistilBertConfig(
        dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
        activation="gelu", dropout=0.0, attention_dropout=0.0),
    # embedding_size < hidden_size: exercises electra.embeddings_project.
    "electra": lambda: transformers.ElectraConfig(embedding_size=16, hidden_size=32,
                                                  max_position_embeddings=64, **_SIZES),
}
LABELS = ("neg", "neutral", "pos")
FIRST = ["a gripping , beautifully shot film .", "dull", "it 's not bad at all , really"]
SECOND = ["is the film good ?", "was it fun for the whole family ?", "yes"]


def hf_checkpoint(model_type, directory, tokenizer_files):
  """A random-init bare encoder saved by transformers (safetensors), with the tokenizer."""
  config = FAMILIES[model_type]()
  config.vocab_size = 30522  # the MiniLM tokenizer's
  torch.manual_seed(0)
  base = transformers.AutoModel.from_config(config).eval()
  base.save_pretrained(directory)
  for name in os.listdir(tokenizer_files):
    shutil.copy(os.path.join(tokenizer_files, name), directory)
  return base


def hf_inputs(tokenizer, hf_config):
  """Padded sentence pairs (token types 0 and 1)."""
  enc = dict(tokenizer(FIRST, SECOND, padding=True, return_tensors="np"))
  # Pad with the model's own pad id, as its tokenizer would (RoBERTa: 1, not 0).
  enc["input_ids"] = np.where(enc["attention_mask"] == 1, enc["input_ids"],
                              hf_config.pad_token_id)
  return enc


def torch_kwargs(enc, model_type):
  if model_type == "distilbert":  # no token types at all
    enc = {k: v for k, v in enc.items() if k != "token_type_ids"}
  elif model_type in ("roberta", "xlm-roberta"):  # one token type: what HF's buffer gives
    enc = dict(enc, token_type_ids=np.zeros_like(enc["input_ids"]))
  return {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in enc.items()}
