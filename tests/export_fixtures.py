"""One fine-tuned tiny run, its SST-2 dev logits and its export, shared by export/predict tests.

Training and compiling dominate these tests' time, so the run is made once per
pytest process (`trained_run` is cached) and its directories removed at exit.
"""

import atexit
import dataclasses
import functools
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from flaxbert_cls.training import runs
from flaxbert_cls.training import evaluate
from flaxbert_cls.serving import export
from flaxbert_cls.data import readers
from flaxbert_cls.training import train
from flaxbert_cls.config import default_config
from model_fixtures import DEMO_DATA, minilm_dir

DEV = os.path.join(DEMO_DATA, "dev.tsv")  # SST-2 dev: 872 sentences


def tiny_run_config(checkpoint: str, **overrides):
  c = default_config()
  c.model_name_or_path = checkpoint
  c.task_name = "sst2"
  c.train_file = os.path.join(DEMO_DATA, "train.tsv")
  c.validation_file = DEV
  c.max_seq_length = 64
  c.seq_buckets = (64,)  # one compiled shape: a fast test
  c.batch_size = 32
  c.eval_batch_size = 64
  # A small learning rate: the head moves, but the class prior does not swamp the inputs.
  c.learning_rate = 1e-4
  c.num_train_steps = 10
  c.warmup_steps = 2
  c.log_every_steps = 10
  c.checkpoint_every_steps = 1000
  c.update(overrides)
  return c


def tiny_bert(directory: str) -> str:
  """A random BERT (hidden 32) with weights large enough that [CLS] differs between inputs."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64, initializer_range=0.2)
  torch.manual_seed(0)
  transformers.BertModel(config).save_pretrained(directory)
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(os.path.join(minilm_dir(), name), directory)
  return directory


@dataclasses.dataclass(frozen=True)
class Run:
  workdir: str
  exported: str  # `export.export(workdir)`
  exp: Any
  params: Any  # NumPy
  sentences: list[str]  # DEV, in file order
  logits: np.ndarray  # `evaluate.evaluate` on DEV, [872, 2]


@functools.lru_cache(maxsize=None)
def trained_run() -> Run:
  """The tiny BERT fine-tuned 10 steps (a head that is not its init), exported."""
  root = tempfile.mkdtemp(prefix="flaxbert-export-test-")
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  checkpoint = tiny_bert(os.path.join(root, "tiny"))
  workdir = os.path.join(root, "run")
  # Eval during training on a few rows; the tests score all of DEV themselves.
  few = os.path.join(root, "dev_head.tsv")
  with open(few, "w") as f:
    f.writelines(open(DEV).readlines()[:17])
  one_device = jax.devices()[:1]
  train.train_and_evaluate(tiny_run_config(checkpoint, validation_file=few), workdir,
                           devices=one_device)
  exp, params = runs.load_run(workdir, devices=one_device)
  examples = readers.read_file(DEV, exp.task, exp.label_names)
  jit_eval = jax.jit(lambda p, b: evaluate.eval_step(p, b, model=exp.model))
  _, logits = evaluate.evaluate(exp, params, exp.tokenize(examples), jit_eval)
  exported = export.export(workdir, os.path.join(root, "exported"))
  return Run(workdir, exported, exp, jax.tree.map(np.asarray, jax.device_get(params)),
             [t[0] for t in examples.texts], logits)
