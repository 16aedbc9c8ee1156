"""ModernBERT-base on whole 20 Newsgroups posts, 2,048 tokens each, on a TPU pod slice.

Where BERT reads a post through 128-token windows (configs/newsgroups.py), ModernBERT reads
up to 2,048 tokens at once: two of its three layers attend within 128 tokens (its local
window), every third over the whole post. On a TPU both run in the splash kernel, the local
layers on their band only (docs/pods.md has the plan).

  python tools/newsgroups_split.py --heldout=0.1     # the training and held-out posts
  flaxbert-cls plan --config=configs/modernbert_long_documents.py \
      --config.model_name_or_path=configs/shapes/modernbert-base --topology=v5e:4x4
  python launch/tpu_vm.py --name=modernbert-20ng --accelerator_type=v5litepod-16 ... \
      --config=configs/modernbert_long_documents.py
"""

import os

import ml_collections

from flaxbert_cls.config import default_config

_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "workdirs", "data", "newsgroups")  # tools/newsgroups_split.py writes here


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.model_name_or_path = "answerdotai/ModernBERT-base"
  c.task_name = "custom"
  c.train_file = os.path.join(_DATA, "train.jsonl")
  c.validation_file = os.path.join(_DATA, "heldout.jsonl")
  c.text_columns = ("text",)
  c.label_column = "label"
  c.metrics = ("accuracy", "f1_macro")
  c.blend_baseline = True  # the bag of words is strong on topic labels (configs/newsgroups.py)
  c.dtype = "bfloat16"
  c.long_document = "truncate"  # a post's first 2,046 tokens: most posts whole
  c.length_grouping_window = 20
  c.max_seq_length = 2048
  c.seq_buckets = (512, 1024, 2048)  # short posts stay in short programs
  c.pooling = "mean"
  c.attention_dropout = 0.0
  # 8 posts per chip on v5e:4x4 (16 chips); the post count per epoch is small (10,182).
  c.batch_size = 128
  c.eval_batch_size = 128
  c.learning_rate = 5e-5
  c.num_train_epochs = 4.0
  c.warmup_ratio = 0.1
  c.log_every_steps = 10
  c.mesh_shape = (-1, 1, 1)
  return c
