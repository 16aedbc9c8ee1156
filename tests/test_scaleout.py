"""FSDP and tensor parallelism through the config's rules: same training on any mesh, less memory.

The equivalence runs are tests/scaleout_fixtures.py's (benchmarks/scaleout_report.py prints
them).
"""

import functools
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flaxbert_cls.training import evaluate
from flaxbert_cls.training import experiment
from flaxbert_cls.model import sharding
from flaxbert_cls.errors import UserError
import scaleout_fixtures as report
from model_fixtures import DEMO_DATA, make_tiny_checkpoint


STEPS = 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """10 steps of a tiny BERT (MiniLM's vocabulary) on each mesh of report.MESHES.

  (1, 1, 1) runs on one device first. The tiny model keeps the five compiles short;
  benchmarks/scaleout_report.py runs the packaged MiniLM itself.
  """
  assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
  tmp = tmp_path_factory.mktemp("scaleout")
  dev = report.small_dev_file(str(tmp))
  tiny = make_tiny_checkpoint(str(tmp / "tiny"), hidden=64, heads=4)
  return dev, tiny, {m: report.run_mesh(m, dev, steps=STEPS, checkpoint=tiny)
                     for m in report.MESHES}


def test_every_mesh_trains_the_same(runs):
  _, _, results = runs
  ref = results[(1, 1, 1)]
  assert len(ref["losses"]) == STEPS
  for mesh, r in results.items():
    np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5, err_msg=str(mesh))
    assert report.max_param_diff(r["params"], ref["params"]) < 1e-5, mesh
  assert len(set(ref["losses"].tolist())) == STEPS  # the runs did train


def test_fsdp_state_is_split_eight_ways(runs):
  dev, tiny, results = runs
  replicated = results[(8, 1, 1)]["state_bytes"]
  fsdp = report.initial_state_bytes((1, 8, 1), dev, checkpoint=tiny)
  assert fsdp <= replicated / 6, (fsdp, replicated)
  # Sharding follows the config's rules for parameters and both Adam moments alike.
  assert results[(2, 4, 1)]["state_bytes"] <= replicated / 3.5


def test_params_and_adam_moments_are_sharded_by_the_rules(runs):
  _, _, results = runs
  specs = results[(2, 2, 2)]["specs"]
  layer0 = "['bert']['encoder']['layer']['0']"
  query = f"{layer0}['attention']['self']['query']['kernel']"
  mlp_out = f"{layer0}['output']['dense']['kernel']"
  for leaf, spec in ((query, P("fsdp", "tensor")), (mlp_out, P("tensor", "fsdp"))):
    found = {k: v for k, v in specs.items() if k.endswith(leaf)}
    # The parameter and Adam's mu and nu (wherever optax nests them) split alike.
    assert {k.split("[")[1] for k in found} == {"'params']", "'opt_state']"}, found
    assert sum(".mu[" in k for k in found) == sum(".nu[" in k for k in found) == 1, found
    assert set(found.values()) == {spec}, found
  # 30522 words do not split 4 ways: 'vocab' falls back to replicated over 'tensor'.
  assert results[(2, 1, 4)]["specs"][
      "['params']['bert']['embeddings']['word_embeddings']['embedding']"] == P(None, "fsdp")


def _tiny_experiment(tmp_path, mesh_shape):
  config = report.scaleout_config(mesh_shape, os.path.join(DEMO_DATA, "dev.tsv"))
  config.model_name_or_path = make_tiny_checkpoint(str(tmp_path / "tiny"), hidden=64, heads=4)
  return experiment.build_experiment(config)


def _compiled_eval_step(exp) -> str:
  """The eval step's optimized HLO for a 16 x 16 batch on the experiment's mesh."""
  boxed, shardings = exp.abstract_params()
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(boxed), shardings)
  batch = {k: jax.ShapeDtypeStruct((16, 16), np.int32, sharding=exp.batch_sharding)
           for k in ("input_ids", "attention_mask", "token_type_ids")}
  forward = jax.jit(functools.partial(evaluate.eval_step, model=exp.model))
  return forward.lower(params, batch).compile().as_text()


def test_fsdp_gathers_weights_not_activations(tmp_path):
  """With the batch pinned, XLA all-gathers weights; unpinned it gathered the whole batch."""
  hlo = _compiled_eval_step(_tiny_experiment(tmp_path, (1, 8, 1)))
  gathered = re.findall(r"= (f32\[[\d,]*\])\S* all-gather", hlo)
  assert "f32[64,64]" in gathered  # attention weights, gathered for use
  # No activation of the global batch (16 x 16 tokens x 64, or the pooled 16 x 64);
  # only the 16 x 2 logits may be gathered, which costs nothing.
  assert not [s for s in gathered if s.startswith("f32[16,") and s != "f32[16,2]"], gathered


def test_non_dividing_axes_fall_back_to_replication():
  mesh = sharding.create_mesh(("data", "fsdp", "tensor"), (2, 1, 4))
  boxed = {"vocab": __import__("flax").linen.Partitioned(
      jax.ShapeDtypeStruct((30522, 384), np.float32), ("vocab", "embed"))}
  rules = (("embed", "fsdp"), ("vocab", "tensor"), ("unused", "no_such_axis"))
  spec = sharding.logical_to_shardings(boxed, mesh, rules)["vocab"].spec
  assert spec == P(None, "fsdp")  # 30522 % 4 != 0: replicated over 'tensor'
  # Activation rules: batch like the inputs, heads/mlp like their weights.
  rules = dict(sharding.activation_rules((("heads", "tensor"), ("mlp", ["tensor"])), mesh))
  assert rules[sharding.ACTIVATION_BATCH] == ("data", "fsdp")
  assert rules[sharding.ACTIVATION_HEADS] == "tensor" and rules[sharding.ACTIVATION_MLP] == "tensor"


def test_initialize_distributed_checks_its_flags(monkeypatch):
  for key in ("FLAXBERT_COORDINATOR", "FLAXBERT_NUM_PROCESSES", "FLAXBERT_PROCESS_ID",
              "FLAXBERT_DISTRIBUTED", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(key, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  sharding.initialize_distributed()  # single process: nothing
  assert not calls
  with pytest.raises(UserError, match="--num_processes"):
    sharding.initialize_distributed("127.0.0.1:1234")
  with pytest.raises(UserError, match="process_id=2"):
    sharding.initialize_distributed("127.0.0.1:1234", 2, 2)
  with pytest.raises(UserError, match="coordinator_address"):
    sharding.initialize_distributed(None, 2, 0)
  monkeypatch.setenv("FLAXBERT_COORDINATOR", "localhost:2222")  # flags win over the environment
  monkeypatch.setenv("FLAXBERT_NUM_PROCESSES", "4")
  monkeypatch.setenv("FLAXBERT_PROCESS_ID", "3")
  sharding.initialize_distributed("127.0.0.1:1234", 2, 1)
  sharding.initialize_distributed()
  assert calls == [dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1),
                   dict(coordinator_address="localhost:2222", num_processes=4, process_id=3)]


def test_mixed_mesh_partitions_without_full_rematerialization(tmp_path, capfd):
  """On a (data, fsdp, tensor) = (2, 2, 2) mesh every reshard has an efficient collective.

  A lookup into the feature-sharded embedding table used to leave the SPMD partitioner
  no way to batch-shard the rows but replicating them (it logs a warning per case).
  """
  exp = _tiny_experiment(tmp_path, (2, 2, 2))
  capfd.readouterr()
  hlo = _compiled_eval_step(exp)
  assert "all-gather" in hlo  # the mesh did partition the step
  assert "Involuntary full rematerialization" not in capfd.readouterr().err
