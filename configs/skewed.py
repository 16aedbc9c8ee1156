"""Skewed classes, three long-tailed sets for comparing what pays for macro F1 on them.

  flaxbert-cls train --config=configs/skewed.py:SET [--config.class_weights=auto|effective]
      [--config.logit_adjustment=1.0]

SET: `sms_spam` (as it is: 13% spam), `sst2_5pct` (SST-2 train sentences, 5% positive in
training and held-out rows alike) or `newsgroups_longtail` (20 Newsgroups training posts, the
groups' counts falling 40-fold from 400 to 10; scored on the near-balanced held-out slice).
`python benchmarks/imbalance.py` makes the sets, trains each method and writes
docs/imbalance.md. Every set: the packaged MiniLM, checkpoints chosen by nothing (the last
one, argmax), scored by macro F1 on rows it never saw; 2 epochs, but 6 on the long-tailed
20 Newsgroups (2,220 posts: 2 epochs are 278 steps, too few to learn 20 groups), which is
also blended with its bag of words (blend_baseline), strong on topic labels.
"""

import os

import ml_collections

from flaxbert_cls.model import hf
from flaxbert_cls.config import default_config

_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "workdirs", "data")
SETS = ("sms_spam", "sst2_5pct", "newsgroups_longtail")


def get_config(name: str = "sst2_5pct") -> ml_collections.ConfigDict:
  if name not in SETS:
    raise ValueError(f"configs/skewed.py:{name}: choose one of {', '.join(SETS)}")
  c = default_config()
  c.model_name_or_path = hf.packaged_minilm_dir()
  c.task_name = "custom"
  c.metrics = ("f1_macro", "accuracy")
  c.label_column = "label"
  c.learning_rate = 1e-4
  c.num_train_epochs = 2.0
  c.warmup_ratio = 0.1
  c.log_every_steps = 50
  c.eval_every_steps = 0
  if name == "newsgroups_longtail":
    c.train_file = os.path.join(_DATA, "skewed", name, "train.jsonl")
    c.validation_file = os.path.join(_DATA, "newsgroups", "heldout.jsonl")
    c.text_columns = ("text",)
    c.max_seq_length = 128
    c.seq_buckets = (32, 64, 128)
    c.length_grouping_window = 20
    c.batch_size = 16
    c.eval_batch_size = 32
    c.num_train_epochs = 6.0  # 834 steps, near the full recipe's 1,272
    c.blend_baseline = True
    return c
  split_dir = os.path.join(_DATA, "sms_spam" if name == "sms_spam" else os.path.join("skewed", name))
  c.train_file = os.path.join(split_dir, "train.tsv")
  c.validation_file = os.path.join(split_dir, "dev.tsv")
  c.text_columns = ("sentence",)
  c.label_names = ("ham", "spam") if name == "sms_spam" else ("negative", "positive")
  c.max_seq_length = 128 if name == "sms_spam" else 64
  c.seq_buckets = (16, 24, 32, 48, 64, 96, 128) if name == "sms_spam" else (16, 32, 48, 64)
  c.length_grouping_window = 20
  c.batch_size = 32
  return c
