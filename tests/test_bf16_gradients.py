"""dtype='bfloat16' all-reduces kernel gradients in bf16 (docs/design.md): across 8 data shards
a run trains like one device to bf16's precision."""

import os

import jax
import numpy as np
import pytest

from flaxbert_cls.config import default_config
from flaxbert_cls.training import train
from model_fixtures import DEMO_DATA, make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_bf16")), hidden=64)


def _config(checkpoint, dev):
  c = default_config()
  c.update(model_name_or_path=checkpoint, task_name="sst2", dtype="bfloat16",
           train_file=os.path.join(DEMO_DATA, "train.tsv"), validation_file=dev,
           max_seq_length=32,
           seq_buckets=(32,), batch_size=32, eval_batch_size=64, learning_rate=1e-3,
           num_train_steps=6, warmup_steps=1, log_every_steps=1, checkpoint_every_steps=1000)
  return c


def test_bf16_gradient_all_reduce_trains_like_one_device(tiny_checkpoint, tmp_path):
  dev = tmp_path / "dev.tsv"  # the final eval is not what is compared: 64 rows do
  dev.write_text("\n".join(open(os.path.join(DEMO_DATA, "dev.tsv")).read().splitlines()[:65])
                 + "\n")
  one = train.train_and_evaluate(_config(tiny_checkpoint, str(dev)), str(tmp_path / "one"),
                                 devices=jax.devices()[:1])
  eight = train.train_and_evaluate(_config(tiny_checkpoint, str(dev)), str(tmp_path / "eight"))
  losses_one = np.array([loss for _, loss in one["train_log"]])
  losses_eight = np.array([loss for _, loss in eight["train_log"]])
  # The first step's loss is before any update: equal up to bf16 matmul order.
  np.testing.assert_allclose(losses_eight[0], losses_one[0], rtol=1e-2)
  # After 6 updates of sums of 8 bf16 partial gradients: within bf16's 2^-8 relative
  # precision per step, compounded (measured: see the assertion's message).
  np.testing.assert_allclose(losses_eight, losses_one, rtol=3e-2,
                             err_msg=f"one {losses_one} eight {losses_eight}")
  params_one = jax.tree.leaves(one["state"].params)
  params_eight = jax.tree.leaves(eight["state"].params)
  scale = max(float(np.abs(np.asarray(p)).max()) for p in params_one)
  worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(params_one, params_eight))
  assert worst < 2e-2 * scale, (worst, scale)
