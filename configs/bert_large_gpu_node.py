"""BERT-large on MNLI on 8-GPU nodes: FSDP within each node, data parallel across nodes.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 --workdir=/shared/runs/bert-large \
      --config=configs/bert_large_gpu_node.py

One node works too (flaxbert-cls train ... on a single 8-GPU machine runs one process
with 8 devices). bf16 compute; parameters, optimizer state, head and loss stay float32.
"""

import ml_collections

from flaxbert_cls.config import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.model_name_or_path = "bert-large-uncased"
  c.task_name = "mnli"
  c.dtype = "bfloat16"
  c.max_seq_length = 128
  c.seq_buckets = (64, 128)
  c.length_grouping_window = 100
  c.batch_size = 128  # global: 8 per GPU on two nodes, 16 on one
  c.eval_batch_size = 512
  c.learning_rate = 3e-5  # BERT-large is less stable than base at high rates
  c.num_train_epochs = 3.0
  c.warmup_ratio = 0.1
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 1000
  # fsdp over the 8 GPUs of a node (NVLink), data over nodes (the slower network
  # only carries one gradient reduction per step).
  c.mesh_shape = (-1, 8, 1)
  return c
