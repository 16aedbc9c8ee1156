"""The batch tokenizer path gives exactly the ids of a plain `tokenizer(...)` call, per row."""

import os

import ml_collections
import numpy as np
import pytest

from flaxbert_cls.model import hf
from flaxbert_cls.data import readers
from flaxbert_cls.data import tasks
from flaxbert_cls.data import tokenization
from model_fixtures import minilm_dir


def _reference(tokenizer, texts, labels, max_seq_length) -> tokenization.TokenizedSplit:
  """One `tokenizer(...)` call per row, as HF's run_glue would: the straightforward answer."""
  ids, types = [], []
  for row in texts:
    enc = tokenizer(*row, truncation="longest_first", max_length=max_seq_length,
                    return_attention_mask=False, return_token_type_ids=True)
    ids.append(np.asarray(enc["input_ids"], np.int32))
    types.append(np.asarray(enc["token_type_ids"], np.int8))
  lengths = np.array([len(r) for r in ids], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  return tokenization.TokenizedSplit(np.concatenate(ids), np.concatenate(types), offsets, labels,
                             int(np.count_nonzero(lengths >= max_seq_length)))


@pytest.fixture(scope="module")
def tokenizer():
  return hf.load_tokenizer(minilm_dir())


@pytest.mark.parametrize("task_name,glue_dir_name", [("sst2", "SST-2"), ("mrpc", "MRPC")])
@pytest.mark.parametrize("max_seq_length", [128, 24])  # 24 truncates many rows and pairs
def test_tokenize_equals_reference(glue_dir, tokenizer, task_name, glue_dir_name,
                                   max_seq_length):
  task = tasks.get_task(ml_collections.ConfigDict({"task_name": task_name}))
  examples = readers.read_file(os.path.join(glue_dir, glue_dir_name, "train.tsv"), task)
  texts, labels = examples.texts[:300], examples.labels[:300]
  want = _reference(tokenizer, texts, labels, max_seq_length)
  # A small chunk crosses chunk boundaries; the slow path is the fallback for Python tokenizers.
  for got in (tokenization.tokenize(tokenizer, texts, labels, max_seq_length),
              tokenization.tokenize(tokenizer, texts, labels, max_seq_length, chunk=7),
              tokenization._tokenize_python(tokenizer, texts, labels, max_seq_length)):
    for key in ("input_ids", "token_type_ids", "offsets", "labels"):
      np.testing.assert_array_equal(getattr(got, key), getattr(want, key), err_msg=key)
      assert getattr(got, key).dtype == getattr(want, key).dtype, key
    assert got.num_truncated == want.num_truncated
  if max_seq_length == 24:
    assert want.num_truncated > 10
  if task_name == "mrpc":
    assert set(np.unique(want.token_type_ids)) == {0, 1}


def test_tokenize_leaves_the_tokenizer_as_it_was(tokenizer):
  before = tokenizer.backend_tokenizer.truncation
  tokenization.tokenize(tokenizer, [("a b c d e f g",)], None, 4)
  assert tokenizer.backend_tokenizer.truncation == before


def test_cached_tokenize_round_trip(tokenizer, tmp_path):
  texts = [("a good film",), ("a bad one , really",)]
  labels = np.array([1, 0], np.int32)
  first = tokenization.cached_tokenize(tokenizer, texts, labels, 8, str(tmp_path))
  [cache] = os.listdir(tmp_path)  # one file, no parts or temporaries left
  again = tokenization.cached_tokenize(tokenizer, texts, labels, 8, str(tmp_path))
  assert cache.startswith("tok-") and cache.endswith(".npz")
  for key in ("input_ids", "token_type_ids", "offsets", "labels"):
    np.testing.assert_array_equal(getattr(again, key), getattr(first, key))
  assert again.content_hash == first.content_hash and again.num_truncated == first.num_truncated


def test_shared_tokenize_without_a_shared_cache_dir(tokenizer, tmp_path, monkeypatch, caplog):
  """Process 1 of 2 whose cache_dir does not see process 0's part: it tokenizes that part
  itself, and the split is still the whole one-process split."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tokenization.jax, "process_count", lambda: 2)
  monkeypatch.setattr(tokenization.jax, "process_index", lambda: 1)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, x]))
  monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
  texts = [(f"row {i} of a small test set",) for i in range(11)]
  labels = np.arange(11, dtype=np.int32) % 2
  with caplog.at_level("INFO", logger="flaxbert_cls.data.tokenization"):
    got = tokenization.cached_tokenize(tokenizer, texts, labels, 8, str(tmp_path))
  assert "Process 1 tokenized rows [5, 11) of 11" in caplog.text
  assert "part0of2.npz not found" in caplog.text
  want = tokenization.tokenize(tokenizer, texts, labels, 8)
  for key in ("input_ids", "token_type_ids", "offsets", "labels"):
    np.testing.assert_array_equal(getattr(got, key), getattr(want, key))
  assert got.num_truncated == want.num_truncated > 0
  assert os.listdir(tmp_path) == []  # process 0 writes the merged file; process 1 removed its part
