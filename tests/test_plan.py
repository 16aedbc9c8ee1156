"""`flaxbert-cls plan`: the run's own train and eval steps compiled for TPU topologies on CPU.

Needs libtpu (the [tpu] extra, which `make test` installs); skipped with that reason without
it. The checkpoints here are a config.json alone: plan reads no weights and no tokenizer.
"""

import json
import os
import sys

import numpy as np
import pytest

from flaxbert_cls.config import default_config
from flaxbert_cls.errors import UserError
from flaxbert_cls.model import topologies
from flaxbert_cls.report import plan_table
from flaxbert_cls.training import experiment
from flaxbert_cls.plan import plan as plan_lib
from conftest import run_cli
from model_fixtures import REPO, minilm_dir

pytestmark = pytest.mark.skipif(not topologies.libtpu_available(),
                                reason=f"libtpu not installed: {topologies.INSTALL_HINT}")


def _config_only_checkpoint(directory, **sizes) -> str:
  """A BERT checkpoint directory holding config.json only (shapes, nothing else)."""
  config = json.load(open(os.path.join(minilm_dir(), "config.json")))
  # Sizes that TPU tiles (8 x 128) hold without padding, even split 4 ways.
  config.update(hidden_size=512, num_hidden_layers=1, num_attention_heads=4,
                intermediate_size=2048, max_position_embeddings=64, vocab_size=1024)
  config.update(sizes)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  return str(directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return _config_only_checkpoint(tmp_path_factory.mktemp("tiny_shapes"))


def _config(checkpoint, **overrides):
  c = default_config()
  c.model_name_or_path = checkpoint
  c.task_name = "sst2"
  c.max_seq_length = 32
  c.seq_buckets = (32,)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.dtype = "bfloat16"
  c.update(overrides)
  return c


_PLANS = {}


def _plan(checkpoint, topology, mesh_shape):
  """One compile per (topology, mesh) in this module (TPU compiles take seconds each)."""
  key = (checkpoint, topology, mesh_shape)
  if key not in _PLANS:
    _PLANS[key] = plan_lib.make_plan(_config(checkpoint, mesh_shape=mesh_shape), topology)
  return _PLANS[key]


def _check_programs(programs, mesh_shape):
  """Per chip, the compiler's arguments are the params + optimizer state + batch sharded as
  the run shards them (TPU tiling pads the few small arrays, the scalars and [hidden, 2] head,
  by under 1% here); the collectives follow the mesh."""
  assert [p["name"] for p in programs] == ["train seq 32", "eval seq 32"]
  for program in programs:
    stats = program["stats"]
    np.testing.assert_allclose(stats["argument_bytes"], program["expected_argument_bytes"],
                               rtol=0.01)
    assert stats["flops"] > 0 and stats["bytes_accessed"] > 0
    assert 0.3 < stats["flops"] / program["analytic_flops"] < 3
  train = programs[0]["stats"]["collectives"]
  if mesh_shape[0] > 1:  # data parallel: gradients all-reduced
    assert train["all-reduce"]["count"] > 0
  if mesh_shape[1] > 1:  # FSDP: parameters gathered
    assert train["all-gather"]["count"] > 0


def _check_tpu_choices(choices):
  """The TPU's choices, not the CPU host's."""
  assert choices["platform"] == "tpu"
  assert choices["attention_impl"] == "xla"  # cuDNN is GPU-only
  assert choices["compiler_options"].startswith("none")  # not the CPU scheduler option
  assert "chip's HBM" in choices["device_memory"]


@pytest.mark.parametrize("mesh_shape", [(4, 1, 1), (1, 4, 1), (1, 1, 4)])
def test_train_step_compiles_with_the_sharded_state_and_batch_as_arguments(tiny, mesh_shape):
  plan = _plan(tiny, "v5e:2x2", mesh_shape)
  assert plan.fits and plan.num_chips == 4
  assert plan.mesh == dict(zip(("data", "fsdp", "tensor"), mesh_shape))
  _check_tpu_choices(plan.choices)
  _check_programs(plan_table.to_json(plan)["programs"], mesh_shape)


def test_fsdp_holds_a_quarter_of_the_state_per_chip(tiny):
  data, fsdp = _plan(tiny, "v5e:2x2", (4, 1, 1)), _plan(tiny, "v5e:2x2", (1, 4, 1))
  ratio = fsdp.programs[0].stats.argument_bytes / data.programs[0].stats.argument_bytes
  assert 0.22 < ratio < 0.3, ratio


def test_a_sweeps_stacked_step_compiles_with_every_members_state(tiny):
  plan = plan_lib.make_plan(_config(tiny, mesh_shape=(4, 1, 1),
                                    sweep={"learning_rate": (1e-4, 3e-4)}), "v5e:2x2")
  train, evaluate = plan.programs
  assert plan.fits and train.examples == 16 and evaluate.examples == 8  # eval: one member's
  solo = _plan(tiny, "v5e:2x2", (4, 1, 1)).programs[0]
  # Two members: twice the trained params, optimizer state and batch of a single run.
  np.testing.assert_allclose(train.stats.argument_bytes, train.expected_argument_bytes, rtol=0.01)
  assert 1.9 < train.stats.argument_bytes / solo.stats.argument_bytes < 2.1


def test_splash_attention_compiles_for_a_tpu_with_the_kernel_in_the_program(tmp_path):
  """attention_impl='splash' on v5e:2x2, batch over 'data' and heads over 'tensor': the
  kernel's Pallas calls are in the compiled train and eval steps (the 128-token bucket;
  the 32-token one and the [CLS]-only last layer stay on XLA), and the table says XLA's
  FLOPs miss them."""
  checkpoint = _config_only_checkpoint(tmp_path / "ckpt", max_position_embeddings=128,
                                       num_hidden_layers=2)  # the last runs [CLS] alone
  plan = plan_lib.make_plan(_config(checkpoint, mesh_shape=(2, 1, 2), attention_impl="splash",
                                    attention_dropout=0.0, max_seq_length=128,
                                    seq_buckets=(32, 128)), "v5e:2x2")
  assert plan.fits and plan.choices["attention_impl"] == "splash"
  calls = {p.name: p.stats.kernel_calls for p in plan.programs}
  assert calls["train seq 32"] == calls["eval seq 32"] == 0, calls
  assert calls["train seq 128"] > 0 and calls["eval seq 128"] > 0, calls
  assert "Splash attention runs as Pallas kernels" in plan_table.table(plan)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_modernbert_flops_count_geglu_and_each_local_layers_band(pooling):
  """plan's analytic FLOPs for ModernBERT: GeGLU's three matrices, a global layer's query
  scoring every key and a local one its 2·(local_attention // 2) + 1; every layer on every
  token under mean pooling, the last one's query, Wo and GeGLU on [CLS] only under cls."""
  import transformers  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import hf  # pylint: disable=g-import-not-at-top
  h, inter, batch = 8, 12, 2
  cfg = hf.model_config(transformers.ModernBertConfig(
      vocab_size=64, hidden_size=h, num_attention_heads=2, intermediate_size=inter,
      num_hidden_layers=3, global_attn_every_n_layers=3, local_attention=4,
      classifier_pooling=pooling))
  assert list(cfg.layer_types) == ["full_attention", "sliding_attention", "sliding_attention"]

  def count(passes, seq, keys):  # matrices, QK^T and PV, the head's dense on [batch, h]
    # Per layer: (query rows, keys): the last layer's queries are one per example under cls.
    rows = [batch * seq, batch * seq, batch * seq if pooling == "mean" else batch]
    per_layer = sum(3 * h * h * batch * seq + r * (h * h + 3 * h * inter) + 2 * h * r * k
                    for r, k in zip(rows, keys))
    return 2 * passes * (per_layer + h * h * batch)
  assert plan_lib._step_flops(3, cfg, batch, 16) == count(3, 16, (16, 5, 5))  # pylint: disable=protected-access
  assert plan_lib._step_flops(1, cfg, batch, 4) == count(1, 4, (4, 4, 4))  # pylint: disable=protected-access


def _plan_args(checkpoint, topology, **overrides):
  settings = dict(model_name_or_path=checkpoint, task_name="sst2", batch_size=8,
                  eval_batch_size=8, max_seq_length=32, seq_buckets="(32,)", dtype="bfloat16")
  settings.update(overrides)
  return ["plan", f"--config={REPO}/configs/default.py", f"--topology={topology}",
          *[f"--config.{k}={v}" for k, v in settings.items()]]


def test_a_run_over_the_chips_hbm_exits_3_with_one_line(tmp_path):
  # 3M x 512 embeddings: 6 GiB of float32 parameters, 3x that with AdamW, on every chip.
  huge = _config_only_checkpoint(tmp_path / "huge", vocab_size=3_000_000)
  code, out, err = run_cli(*_plan_args(huge, "v5e:2x2", mesh_shape="(4,1,1)"), "--largest_only",
                           f"--json={tmp_path / 'plan.json'}")
  assert code == plan_lib.NOT_FITTING_EXIT_CODE
  line, = [l for l in err.splitlines() if l.startswith("plan:")]
  assert "train seq 32 does not fit a v5e chip on v5e:2x2" in line
  assert "G short" in line and "fsdp" in line and "batch_size" in line
  assert "no remat_policy makes it fit" in line  # the parameters, not the activations
  assert "refused: out of memory" in out
  saved = json.load(open(tmp_path / "plan.json"))
  assert saved["fits"] is False and "RESOURCE_EXHAUSTED" in saved["programs"][0]["refused"]


def test_plan_cli_compiles_for_v4_and_lists_topologies(tiny, tmp_path):
  code, out, _ = run_cli(*_plan_args(tiny, "v4:2x2x1", mesh_shape="(2,2,1)"),
                         f"--json={tmp_path / 'plan.json'}")
  assert code == 0
  assert "| train seq 32 | 8 |" in out and "| eval seq 32 | 8 |" in out and "estimates" in out
  saved = json.load(open(tmp_path / "plan.json"))
  assert saved["fits"] and saved["chip"]["name"] == "v4" and saved["num_chips"] == 4
  _check_tpu_choices(saved["choices"])
  _check_programs(saved["programs"], (2, 2, 1))
  code, out, _ = run_cli("plan", "--list")
  names = out.split()
  assert code == 0 and {"v4:2x2x1", "v5e:2x2", "v5e:4x4", "v5p:2x2x1", "v6e:4x4"} <= set(names)


def test_automatic_mesh_sizes_from_the_target_chips_hbm(tmp_path):
  # 1.5G parameters x 16 bytes of state (23 GiB): over 35% of a v5e's 16 GiB unless split 8 ways.
  big = _config_only_checkpoint(tmp_path / "big", vocab_size=3_000_000)
  exp = experiment.build_experiment(_config(big, mesh_shape=(), batch_size=16, eval_batch_size=16),
                                    devices=topologies.topology_devices("v5e:4x4"),
                                    shapes_only=True)
  assert dict(exp.mesh.shape) == {"data": 2, "fsdp": 8, "tensor": 1}
  assert exp.tokenizer is None


def test_bad_topologies_and_meshes_are_one_line_errors(tiny, monkeypatch):
  with pytest.raises(UserError, match=r"--topology='v7x:2x2': use GENERATION:SHAPE"):
    topologies.topology_devices("v7x:2x2")
  with pytest.raises(UserError, match=r"--topology=v5e:3x3: libtpu refuses it: .*divisible"):
    topologies.topology_devices("v5e:3x3")
  with pytest.raises(UserError, match=r"config.mesh_shape=\(3, 1, 1\) does not fit 4 devices"):
    plan_lib.make_plan(_config(tiny, mesh_shape=(3, 1, 1)), "v5e:2x2")
  code, _, err = run_cli(*_plan_args(tiny, "v5e:2x2", mesh_shape="(1,1,8)"))
  assert code == 2 and len(err.strip().splitlines()) == 1 and "does not fit 4 devices" in err
  monkeypatch.setitem(sys.modules, "libtpu", None)  # as if it were not installed
  with pytest.raises(UserError, match=r"needs libtpu: pip install 'flaxbert-cls\[tpu\]'"):
    topologies.topology_devices("v5e:2x2")
  with pytest.raises(UserError, match=r"--topology='h100:8x': use .* e\.g\. h100:8, or host"):
    topologies.topology_devices("h100:8x")
  if not topologies.gpu_plugin_available():  # the suite's environment: no 5 GB of CUDA wheels
    with pytest.raises(UserError, match=r"--topology=h100:8: compiling for a GPU needs jax's "
                                        r"CUDA plugin: pip install 'jax\[cuda12\]=="):
      topologies.topology_devices("h100:8")
