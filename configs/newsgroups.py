"""20 Newsgroups (20 classes, long posts) with the packaged MiniLM at max_seq_length=128.

Make the data first (a fixed-seed, stratified held-out split of the bydate train posts):
  python tools/newsgroups_split.py --heldout=0.1 --train_subset=800
then compare the long-document layouts with identical settings:
  flaxbert-cls train --config=configs/newsgroups.py --workdir=workdirs/ngB_windows
  flaxbert-cls train --config=configs/newsgroups.py --workdir=workdirs/ngB_truncate \
      --config.long_document=truncate   (and head_tail)
Most posts are longer than 128 tokens: 'windows' reads up to max_windows x 126 of them
(docs/long_documents.md: windows 0.6784 vs truncate 0.6307 held-out accuracy on 800 posts).
"""

import os

import ml_collections

from flaxbert_cls.model import hf
from flaxbert_cls.config import default_config

_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "workdirs", "newsgroups")  # tools/newsgroups_split.py writes here


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.model_name_or_path = hf.packaged_minilm_dir()
  c.task_name = "custom"
  c.train_file = os.path.join(_DATA, "train.jsonl")
  c.validation_file = os.path.join(_DATA, "heldout.jsonl")
  c.text_columns = ("text",)
  c.label_column = "label"
  c.metrics = ("accuracy", "f1_macro")
  c.max_seq_length = 128
  c.seq_buckets = (32, 64, 128)
  c.length_grouping_window = 20  # documents of similar length (window count) share batches
  c.long_document = "windows"
  c.window_stride = 126  # no overlap: 4 windows read the first 504 text tokens
  c.max_windows = 4
  c.window_pooling = "mean"
  # Shrunk for a shared 2-core CPU, the same for every layout: 800 training posts, two
  # epochs, the bottom 4 of 6 layers (and the embeddings) frozen.
  c.freeze_bottom_layers = 4
  c.batch_size = 8
  c.eval_batch_size = 32
  c.learning_rate = 5e-4  # only the top 2 layers and the head train
  c.num_train_epochs = 2.0
  c.warmup_ratio = 0.1
  c.log_every_steps = 10
  c.eval_every_steps = 0
  return c
