"""BERT-base (or -large) on MNLI on a Cloud TPU pod slice: data parallel over every chip, bf16.

  python launch/tpu_vm.py --name=bert-mnli --zone=us-central2-b --accelerator_type=v4-32 \
      --workdir=gs://BUCKET/runs/bert-mnli --config=configs/bert_base_tpu_pod.py

BERT-large: --config.model_name_or_path=bert-large-uncased --config.learning_rate=5e-5.
Data comes from the HF hub (nyu-mll/glue) unless --config.data_dir names a GLUE copy
that every worker can read.
"""

import ml_collections

from flaxbert_cls.config import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.model_name_or_path = "bert-base-uncased"
  c.task_name = "mnli"
  c.dtype = "bfloat16"  # compute; parameters, optimizer state, head and loss stay float32
  c.max_seq_length = 128
  c.seq_buckets = (64, 128)
  c.length_grouping_window = 100  # batches of similar lengths: less padding
  # Global batch over the whole pod (a v4-32 slice is 16 chips: 16 examples per chip).
  # The BERT paper's MNLI recipe is batch 32 at 2e-5..5e-5; 8x the batch, ~2x the rate.
  c.batch_size = 256
  c.eval_batch_size = 1024
  c.learning_rate = 1e-4
  c.num_train_epochs = 3.0
  c.warmup_ratio = 0.1
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 500  # the most work a preemption loses
  # Pure data parallelism: BERT-base's parameters + AdamW moments (~1.3 GB in float32)
  # fit a chip many times over, and FSDP would all-gather every weight on every step.
  # BERT-large and up on small chips: mesh_shape=(1, -1, 1) (FSDP), min_size_to_shard_mb=4.
  # Batch sizes must divide by the chip count.
  c.mesh_shape = (-1, 1, 1)
  c.min_size_to_shard_mb = 4.0  # if FSDP is switched on
  return c
