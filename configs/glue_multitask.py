"""SST-2, CoLA, MRPC and RTE in one run: a shared encoder, one head per task.

  flaxbert-cls train --config=configs/glue_multitask.py --workdir=runs/glue4 \
      --config.data_dir=/path/to/glue

`data_dir` (shared by every task) is a GLUE directory holding SST-2/, CoLA/, MRPC/ and
RTE/ with train.tsv and dev.tsv (the GLUE download script's layout; its parent also
works); empty = the HF hub dataset nyu-mll/glue. A task can take its own source instead,
e.g. {"task_name": "rte", "tfds_name": "glue/rte", "tfds_data_dir": "..."}.
Batches are drawn per step with p(task) ~ size^(1/2) (temperature 2), so the small tasks
(MRPC, RTE) are seen often enough without exhausting them; best checkpoints and early
stopping use the average of the tasks' main metrics. Export writes OUT/<task>/ per task.
"""

import ml_collections

from flaxbert_cls.config import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.model_name_or_path = "bert-base-uncased"
  c.data_dir = ""  # --config.data_dir=/path/to/glue (see above)
  c.tasks = tuple({"task_name": name} for name in ("sst2", "cola", "mrpc", "rte"))
  c.mixing = "temperature"
  c.mixing_temperature = 2.0
  c.selection_metric = "average"
  c.max_seq_length = 128
  c.seq_buckets = (32, 64, 128)
  c.batch_size = 32
  c.learning_rate = 2e-5
  c.num_train_epochs = 3.0  # epochs of all four training sets together
  c.eval_every_steps = 1000
  c.keep_best_checkpoints = 1
  return c
