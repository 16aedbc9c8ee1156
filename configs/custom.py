"""A custom task: any CSV/TSV/JSONL with text and label columns (here a tiny JSONL sample).

Point it at your files with --config.train_file/--config.validation_file and set
--config.text_columns / --config.label_column to your column names.
"""

import os

from flaxbert_cls.config import default_config

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
  c = default_config()
  c.task_name = "custom"
  c.train_file = os.path.join(_REPO, "examples/data/custom_example.jsonl")
  c.validation_file = os.path.join(_REPO, "examples/data/custom_example.jsonl")
  c.text_columns = ("text",)
  c.label_column = "label"
  c.label_names = ()  # built from the training file, sorted
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_train_epochs = 3.0
  return c
