"""Demo: the packaged pre-trained MiniLM on an 8,000-example SST-2 sample shipped in the repo.

Evaluates on the full SST-2 dev set (872 sentences). `make demo` runs it.
"""

import os

import ml_collections

from flaxbert_cls.model import hf
from flaxbert_cls.config import default_config

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.model_name_or_path = hf.packaged_minilm_dir()  # else the same weights' hub id
  c.task_name = "sst2"
  c.train_file = os.path.join(_REPO, "examples/data/sst2/train.tsv")
  c.validation_file = os.path.join(_REPO, "examples/data/sst2/dev.tsv")
  c.max_seq_length = 64
  c.seq_buckets = (16, 32, 48, 64)
  c.length_grouping_window = 50  # batches of similar lengths: less padding, ~2x faster
  c.batch_size = 32
  c.learning_rate = 1e-4
  c.num_train_epochs = 2.0
  c.warmup_ratio = 0.1
  c.log_every_steps = 50
  c.eval_every_steps = 250
  return c
