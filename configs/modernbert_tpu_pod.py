"""ModernBERT-base on MNLI on a Cloud TPU pod slice: data parallel over every chip, bf16.

  python launch/tpu_vm.py --name=modernbert-mnli --zone=us-central2-b --accelerator_type=v4-32 \
      --workdir=gs://BUCKET/runs/modernbert-mnli --config=configs/modernbert_tpu_pod.py

The plan first, on any host (shapes from configs/shapes/modernbert-base, no weights):
  flaxbert-cls plan --config=configs/modernbert_tpu_pod.py \
      --config.model_name_or_path=configs/shapes/modernbert-base --topology=v4:2x2x4
ModernBERT-large: --config.model_name_or_path=answerdotai/ModernBERT-large, lr 3e-5.
"""

import ml_collections

from flaxbert_cls.config import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.model_name_or_path = "answerdotai/ModernBERT-base"
  c.task_name = "mnli"
  c.dtype = "bfloat16"  # compute; parameters, optimizer state, head and loss stay float32
  # MNLI pairs are short: buckets keep short batches short. Splash is auto from 512 tokens.
  c.max_seq_length = 256
  c.seq_buckets = (64, 128, 256)
  c.length_grouping_window = 100
  c.pooling = "mean"  # the checkpoint's classifier_pooling
  c.attention_dropout = 0.0  # ModernBERT has none; fused attention kernels take none
  # 16 examples per chip on a v4-32 slice (16 chips); the ModernBERT paper's GLUE sweeps
  # use lr 5e-5..8e-5 at batch 16..32: 8x the batch, the low end of the rates.
  c.batch_size = 256
  c.eval_batch_size = 1024
  c.learning_rate = 8e-5
  c.weight_decay = 1e-5
  c.num_train_epochs = 2.0
  c.warmup_ratio = 0.06
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 500  # the most work a preemption loses
  # 149M parameters + AdamW moments fit every chip: data parallel, no FSDP gathers.
  c.mesh_shape = (-1, 1, 1)
  return c
