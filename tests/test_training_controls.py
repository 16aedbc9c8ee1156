"""Freezing, layer-wise LR decay, gradient accumulation, schedules, determinism: exact effects."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from flaxbert_cls.training import runs
from flaxbert_cls.training import starts
from flaxbert_cls.training import evaluate
from flaxbert_cls.training import experiment
from flaxbert_cls.training import optimizer as optim
from flaxbert_cls.training import train
from flaxbert_cls.config import default_config
from model_fixtures import make_tiny_checkpoint
from model_fixtures import small_config


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def tiny_no_dropout(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_nodrop")),
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _flat(params):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(
      jax.device_get(params)).items()}


def _loaded_params(checkpoint):
  """The parameters a run starts from (pre-trained encoder + the seeded new head)."""
  exp = experiment.build_experiment(small_config(checkpoint), devices=jax.devices()[:1])
  return _flat(starts.create_train_state(exp, 1, checkpoint)[0].params)


def _opt_state_bytes(opt_state):
  return sum(x.nbytes for x in jax.tree.leaves(opt_state) if hasattr(x, "nbytes"))


def test_frozen_parameters_stay_bitwise_equal_and_have_no_optimizer_state(tiny_checkpoint,
                                                                          tmp_path):
  one_device = jax.devices()[:1]
  frozen = train.train_and_evaluate(small_config(tiny_checkpoint, freeze_bottom_layers=1,
                                                 num_train_steps=3), str(tmp_path / "f"),
                                    devices=one_device)
  full = train.train_and_evaluate(small_config(tiny_checkpoint, num_train_steps=3),
                                  str(tmp_path / "full"), devices=one_device)
  start = _loaded_params(tiny_checkpoint)
  after = _flat(frozen["state"].params)
  frozen_paths = [k for k in after if k.startswith(("bert/embeddings/", "bert/encoder/layer/0/"))]
  assert len(frozen_paths) >= 10
  for path in after:
    if path in frozen_paths:
      np.testing.assert_array_equal(after[path], start[path])  # bitwise: never touched
    else:
      assert not np.array_equal(after[path], start[path]), path
  # Frozen parameters carry no Adam moments: the optimizer state shrinks accordingly.
  frozen_bytes = _opt_state_bytes(frozen["state"].opt_state)
  full_bytes = _opt_state_bytes(full["state"].opt_state)
  frozen_param_bytes = sum(after[k].nbytes for k in frozen_paths)
  assert full_bytes - frozen_bytes == pytest.approx(2 * frozen_param_bytes, abs=64)


def test_layerwise_lr_decay_multipliers():
  params = {"bert": {"embeddings": {"word_embeddings": {"embedding": 0}},
                     "encoder": {"layer": {str(i): {"output": {"dense": {"kernel": 0}}}
                                           for i in range(3)}},
                     "pooler": {"dense": {"kernel": 0}}},
            "classifier": {"kernel": 0}}
  config = default_config()
  config.layerwise_lr_decay = 0.5
  m = _flat(optim.learning_rate_multipliers(params, config))
  assert m["bert/embeddings/word_embeddings/embedding"] == 0.5 ** 4
  assert [m[f"bert/encoder/layer/{i}/output/dense/kernel"] for i in range(3)] == [0.5 ** 3,
                                                                                 0.5 ** 2, 0.5]
  assert m["bert/pooler/dense/kernel"] == 1.0 and m["classifier/kernel"] == 1.0


def test_layerwise_lr_decay_scales_each_update_by_its_multiplier(tiny_no_dropout, tmp_path):
  """First step: same gradients, so each parameter's move is its multiplier times the full move."""
  base = dict(num_train_steps=1, warmup_steps=0, lr_schedule="constant", weight_decay=0.0)
  start = _loaded_params(tiny_no_dropout)
  moves = {}
  for decay in (1.0, 0.5):
    run = train.train_and_evaluate(small_config(tiny_no_dropout, layerwise_lr_decay=decay,
                                                **base), str(tmp_path / str(decay)))
    after = _flat(run["state"].params)
    moves[decay] = {k: after[k] - start[k] for k in after}
  expected = {"classifier/kernel": 1.0, "bert/pooler/dense/kernel": 1.0,
              "bert/encoder/layer/1/output/dense/kernel": 0.5,
              "bert/encoder/layer/0/output/dense/kernel": 0.25,
              "bert/embeddings/LayerNorm/scale": 0.125}
  for key, multiplier in expected.items():
    np.testing.assert_allclose(moves[0.5][key], multiplier * moves[1.0][key], rtol=1e-4,  # float32 rounding of p + dp - p
                               atol=1e-7, err_msg=key)


def test_gradient_accumulation_equals_the_full_batch(tiny_no_dropout, tmp_path):
  runs = {k: train.train_and_evaluate(
      small_config(tiny_no_dropout, gradient_accumulation_steps=k, num_train_steps=3),
      str(tmp_path / f"k{k}")) for k in (1, 4)}
  one, four = _flat(runs[1]["state"].params), _flat(runs[4]["state"].params)
  for key in one:
    np.testing.assert_allclose(four[key], one[key], atol=1e-5, err_msg=key)
  np.testing.assert_allclose([l for _, l in runs[4]["train_log"]],
                             [l for _, l in runs[1]["train_log"]], atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedules_warm_up_then_decay(kind):
  config = default_config()
  config.update(learning_rate=1.0, lr_schedule=kind, warmup_steps=10)
  schedule = optim.create_learning_rate_schedule(config, total_steps=110)
  assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  end = {"linear": 0.0, "cosine": 0.0, "constant": 1.0}[kind]
  assert float(schedule(110)) == pytest.approx(end, abs=1e-6)
  middle = {"linear": 0.5, "cosine": 0.5, "constant": 1.0}[kind]
  assert float(schedule(60)) == pytest.approx(middle, abs=1e-6)
  config.update(warmup_steps=-1, warmup_ratio=0.25)
  assert optim.warmup_steps_for(config, 200) == 50


def test_same_seed_same_parameters_bitwise(tiny_checkpoint, tmp_path):
  runs = [train.train_and_evaluate(small_config(tiny_checkpoint, num_train_steps=4),
                                   str(tmp_path / str(i)))["state"].params for i in range(2)]
  for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = train.train_and_evaluate(small_config(tiny_checkpoint, num_train_steps=4, seed=7),
                                   str(tmp_path / "other"))["state"].params
  assert not np.array_equal(np.asarray(jax.tree.leaves(other)[-1]),
                            np.asarray(jax.tree.leaves(runs[0])[-1]))


def test_bfloat16_compute_keeps_float32_parameters_and_logits(tiny_checkpoint, tmp_path):
  run = train.train_and_evaluate(small_config(tiny_checkpoint, dtype="bfloat16",
                                              num_train_steps=3), str(tmp_path),
                                 devices=jax.devices()[:1])
  assert {x.dtype for x in jax.tree.leaves(run["state"].params)} == {np.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(run["state"].opt_state)
          if hasattr(x, "dtype") and x.ndim > 0} == {np.dtype("float32")}
  exp, params = runs.load_run(str(tmp_path), devices=jax.devices()[:1])
  batch = {k: np.ones((2, 8), np.int32) for k in ("input_ids", "attention_mask",
                                                  "token_type_ids")}
  logits = evaluate.eval_step(params, batch, model=exp.model)
  assert logits.dtype == np.float32 and np.isfinite(np.asarray(logits)).all()
  assert np.isfinite([l for _, l in run["train_log"]]).all()


def test_lora_trains_only_adapters_and_head_and_merges_exactly(tiny_checkpoint, tmp_path):
  config = small_config(tiny_checkpoint, lora_rank=4, lora_alpha=8.0, num_train_steps=4,
                        learning_rate=1e-2)
  run = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  start = _loaded_params(tiny_checkpoint)
  after = _flat(run["state"].params)
  adapters = [k for k in after if "/lora_" in k]
  assert sorted({k.split("/")[-2] for k in adapters}) == ["query", "value"]
  assert len(adapters) == 2 * 2 * 2  # 2 layers x (query, value) x (lora_a, lora_b)
  for key, value in after.items():
    if "/lora_" in key or key.startswith("classifier/"):
      continue
    np.testing.assert_array_equal(value, start[key])  # the base model is frozen
  assert any(np.abs(after[k]).max() > 0 for k in adapters if k.endswith("lora_b"))
  # Only adapters and head carry Adam moments.
  trained_bytes = sum(after[k].nbytes for k in after if "/lora_" in k or
                      k.startswith("classifier/"))
  assert _opt_state_bytes(run["state"].opt_state) <= 2 * trained_bytes + 64
  # Merged (plain BERT) logits equal the adapter model's logits.
  exp, merged = runs.load_run(str(tmp_path), devices=jax.devices()[:1])
  assert exp.model.config.lora_rank == 0
  assert not any("lora_" in k for k in _flat(merged))
  rng = np.random.default_rng(0)
  batch = dict(input_ids=rng.integers(1000, 3000, (4, 16)).astype(np.int32),
               attention_mask=np.ones((4, 16), np.int32),
               token_type_ids=np.zeros((4, 16), np.int32))
  lora_model = exp.model.clone(config=__import__("dataclasses").replace(
      exp.model.config, lora_rank=4, lora_alpha=8.0))
  unmerged = evaluate.eval_step(run["state"].params, batch, model=lora_model)
  np.testing.assert_allclose(evaluate.eval_step(merged, batch, model=exp.model), unmerged,
                             atol=1e-5)
