"""All nine GLUE tasks in one run on a TPU pod slice: shared encoder, nine heads, bf16.

  python launch/tpu_vm.py --name=glue-all --zone=us-central2-b --accelerator_type=v4-32 \
      --workdir=gs://BUCKET/runs/glue-all --config=configs/glue_all_pod.py \
      --config.data_dir=/mnt/glue   # or gs://...; '' = the HF hub (nyu-mll/glue)

Every worker reads every task's files and materializes only its rows of each global
batch. STS-B gets a regression head; MNLI is scored on dev_matched. Mixing is
temperature-scaled (T=2): MNLI/QQP (~400k) do not drown WNLI/RTE (~600 / 2.5k).
One compiled train program per length bucket, whichever task a step draws.
"""

import ml_collections

from flaxbert_cls.config import default_config

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.model_name_or_path = "bert-base-uncased"
  c.data_dir = ""  # --config.data_dir=/path/to/glue, readable by every worker
  c.tasks = tuple({"task_name": name} for name in GLUE_TASKS)
  c.mixing = "temperature"
  c.mixing_temperature = 2.0
  c.selection_metric = "average"
  c.dtype = "bfloat16"  # compute; parameters, heads and loss stay float32
  c.max_seq_length = 128
  c.seq_buckets = (64, 128)
  c.length_grouping_window = 100
  c.batch_size = 256  # global, over the pod; must divide by the chip count
  c.eval_batch_size = 1024
  c.learning_rate = 1e-4
  c.num_train_steps = 60000
  c.warmup_ratio = 0.06
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 500
  c.keep_best_checkpoints = 2
  # Pure data parallelism: BERT-base's parameters + AdamW moments (~1.3 GB in float32)
  # fit a chip many times over, and FSDP would all-gather every weight on every step.
  # BERT-large and up on small chips: mesh_shape=(1, -1, 1) (FSDP), min_size_to_shard_mb=4.
  # Batch sizes must divide by the chip count.
  c.mesh_shape = (-1, 1, 1)
  c.min_size_to_shard_mb = 4.0  # if FSDP is switched on
  return c
