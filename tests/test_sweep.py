"""Sweeps: the grid, members equal their solo runs, exact resume, the results table, export."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.training import runs
from flaxbert_cls.training import starts
from flaxbert_cls.training import checkpoints as checkpoint_lib
from flaxbert_cls import config as config_lib
from flaxbert_cls.training import experiment
from flaxbert_cls.serving import export
from flaxbert_cls.model import hf
from flaxbert_cls.training import members as sweep
from flaxbert_cls.training import train
from flaxbert_cls.training import evaluate
from flaxbert_cls.decisions import calibration
from flaxbert_cls.decisions import ensemble
from flaxbert_cls.errors import UserError
from model_fixtures import make_tiny_checkpoint
from numerics import assert_close
from model_fixtures import small_config


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


def sweep_config(checkpoint, **overrides):
  # One bucket: every member's batch pads to the length of its solo run's (sweep.py).
  c = small_config(checkpoint, num_train_steps=4, warmup_steps=-1, warmup_ratio=0.25,
                   weight_decay=0.01, seq_buckets=(64,), checkpoint_every_steps=2, **overrides)
  c.sweep.learning_rate = (1e-3, 3e-3)
  c.sweep.seed = (0, 1)
  return c


def _leaves(params):
  return jax.tree.leaves(jax.device_get(params))


def test_grid_order_and_bad_keys():
  c = config_lib.default_config()
  c.sweep.learning_rate = (1e-5, 2e-5)
  c.sweep.seed = (0, 1, 2)
  assert [(m["learning_rate"], m["seed"]) for m in config_lib.grid(c)] == [
      (1e-5, 0), (1e-5, 1), (1e-5, 2), (2e-5, 0), (2e-5, 1), (2e-5, 2)]
  solo = config_lib.member_config(c, config_lib.grid(c)[4])
  assert (solo.learning_rate, solo.seed, config_lib.grid(solo)) == (2e-5, 1, [])
  for key, value, message in (("seed", (0.5,), "seeds must be integers"),
                              ("learning_rate", ("1e-5",), "values must be numbers"),
                              ("learning_rate", (1e-5, -1.0), "learning_rate=-1.0: must be > 0"),
                              ("weight_decay", (0.1, 0.1), "appears twice")):
    bad = config_lib.default_config()
    bad.sweep[key] = value
    with pytest.raises(UserError, match=message) as e:
      config_lib.validate(bad)
    assert "\n" not in str(e.value) and "sweep" in str(e.value)
  bad = config_lib.default_config()
  with bad.sweep.unlocked():
    bad.sweep.max_seq_length = (64,)
  with pytest.raises(UserError, match="config.sweep.max_seq_length: not a sweep key"):
    config_lib.validate(bad)
  bad = config_lib.default_config()
  bad.sweep.seed = (0, 1)
  bad.long_document = "windows"
  with pytest.raises(UserError, match="long_document='windows': not supported"):
    config_lib.validate(bad)
  bad.sweep = config_lib.default_config().sweep  # no sweep: windows are fine
  config_lib.validate(bad)


@pytest.fixture(scope="module")
def swept(tiny_checkpoint, tmp_path_factory):
  """A 2 lr x 2 seed sweep, members over a 'member' mesh axis of 2 (x 4 data shards)."""
  workdir = str(tmp_path_factory.mktemp("sweep"))
  config = sweep_config(tiny_checkpoint, mesh_axes=("member", "data", "fsdp", "tensor"),
                        mesh_shape=(2, -1, 1, 1))
  return config, workdir, train.train_and_evaluate(config, workdir, devices=jax.devices()[:2])


def test_every_member_equals_its_solo_run(swept, tmp_path):
  config, workdir, result = swept
  members = config_lib.grid(config)
  # Trained leaves are stacked over a member axis split over 2 devices.
  kernel = result["state"].params["classifier"]["kernel"]
  assert kernel.shape[0] == 4 and kernel.sharding.spec[0] == "member"
  # Member 3 (lr 3e-3, seed 1: both differ from member 0's) on the second device; solo
  # runs take long on a loaded CPU: benchmarks/bench_sweep.py --check compares every member.
  for i in (3,):
    member = members[i]
    solo = train.train_and_evaluate(config_lib.member_config(config, member), str(tmp_path / str(i)),
                                    devices=jax.devices()[:1])
    _, params = runs.load_run(workdir, member=i)
    for got, want in zip(_leaves(params), _leaves(solo["state"].params)):
      # floor: a key bias is zero in exact arithmetic (rounding noise only); lr is the
      # scale of one update.
      assert_close(got, want, rel=1e-5, floor=member["learning_rate"],
                   err_msg=f"member {i} {member}")
    assert result["eval"][f"member{i}/accuracy"] == solo["eval"]["accuracy"], member
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert result["eval"]["member0/accuracy"] == records[0]["accuracy"]
  assert [(r["member"], r["learning_rate"], r["seed"]) for r in records] == [
      (i, m["learning_rate"], m["seed"]) for i, m in enumerate(members)]


def test_resume_of_a_lora_sweep_is_exact(tiny_checkpoint, tmp_path):
  config = sweep_config(tiny_checkpoint, lora_rank=2)
  devices = jax.devices()[:1]
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"), devices=devices)
  base = whole["state"].params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
  assert base["kernel"].ndim == 2 and base["lora_a"].shape[0] == 4  # base shared, adapters stacked
  resumed_dir = str(tmp_path / "resumed")
  shutil.copytree(str(tmp_path / "whole"), resumed_dir)
  ckpt = checkpoint_lib.Checkpoints(resumed_dir)
  ckpt.delete_after(2)  # as if killed after step 2's save
  ckpt.close()
  resumed = train.train_and_evaluate(config, resumed_dir, devices=devices)
  assert resumed["train_log"][0][0] == 3
  for got, want in zip(_leaves(resumed["state"]), _leaves(whole["state"])):
    np.testing.assert_array_equal(got, want)
  assert resumed["sweep"] == whole["sweep"]


def test_results_table_matches_numpy():
  members = [{"learning_rate": lr, "seed": s} for lr in (1e-5, 2e-5) for s in (0, 1, 2)]
  values = [0.80, 0.84, 0.83, 0.86, 0.70, 0.88]
  table = sweep.results_table(members, values, "accuracy")
  for row, chunk in zip(table["settings"], (values[:3], values[3:])):
    assert row["mean"] == pytest.approx(np.mean(chunk))
    assert row["std"] == pytest.approx(np.std(chunk, ddof=1))
    assert row["median"] == pytest.approx(np.median(chunk))
  assert table["best_setting"] == 0  # mean 0.8233 > 0.8133, though member 5 is the best one
  assert table["best_member"] == 5
  assert "0.8233 ± 0.0208 **(best)**" in sweep.results_markdown(table)


def test_export_member_picks_its_params(swept, tmp_path):
  config, workdir, result = swept
  assert json.load(open(os.path.join(workdir, workdir_lib.SWEEP_RESULTS_JSON)))["members"][0]["seed"] == 0
  stacked = jax.device_get(result["state"].params)
  out = export.export(workdir, str(tmp_path / "m2"), member="2")
  state_dict = load_file(os.path.join(out, hf.SAFETENSORS_NAME))
  np.testing.assert_array_equal(state_dict["classifier.weight"],
                                stacked["classifier"]["kernel"][2].T)
  assert json.load(open(os.path.join(out, export.METADATA_NAME)))["member"] == 2
  exp, _ = runs.load_run(workdir)  # default: the best member
  assert exp.member == result["best"]["member"]
  with pytest.raises(UserError, match="members 0..3"):
    runs.load_run(workdir, member="7")


def test_ensemble_logits_carry_the_members_mean_probability():
  rng = np.random.default_rng(0)
  members = [rng.normal(0, 4, (50, 3)) for _ in range(3)]
  single = ensemble.ensemble_logits(members)
  want = np.mean([calibration.softmax(m) for m in members], 0)
  np.testing.assert_allclose(calibration.softmax(single), want, rtol=1e-5)
  multi = ensemble.ensemble_logits(members, multi_label=True)
  want = np.mean([calibration.sigmoid(m) for m in members], 0)
  np.testing.assert_allclose(calibration.sigmoid(multi), want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(ensemble.ensemble_logits(members, regression=True),
                             np.mean(members, 0), rtol=1e-6)
  with pytest.raises(ValueError, match="differ in shape"):
    ensemble.ensemble_logits([members[0], members[1][:10]])


def test_eval_of_member_mean_averages_every_members_probabilities(swept, tmp_path):
  _, workdir, _ = swept
  path = os.path.join(workdir, workdir_lib.EVAL_DIR, workdir_lib.PREDICTIONS_FILE)

  def probabilities():
    rows = [json.loads(line) for line in open(path)]
    return np.array([[r["probabilities"][n] for n in ("0", "1")] for r in rows])

  each = []
  for i in range(4):
    evaluate.evaluate_workdir(workdir, member=str(i))
    each.append(probabilities())
  results = evaluate.evaluate_workdir(workdir, member="mean")
  mean = np.mean(each, 0)
  np.testing.assert_allclose(probabilities(), mean, rtol=1e-5, atol=1e-7)
  labels = [json.loads(line)["label"] for line in open(path)]
  assert results["accuracy"] == np.mean(mean.argmax(-1) == np.array(labels, int))
  with pytest.raises(UserError, match="its own best step"):
    runs.load_run(workdir, step="best", member="mean")
  _ensemble_predicts_and_exports_its_mean(workdir, tmp_path, mean)


def _ensemble_predicts_and_exports_its_mean(workdir, tmp_path, mean):
  """predict --member=mean gives eval's mean probabilities; its export loads in PyTorch
  (trust_remote_code) and in predict with the same logits (1e-4), thresholds included."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from flaxbert_cls.serving import predict  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.decisions import tuning  # pylint: disable=g-import-not-at-top
  rows = [json.loads(line) for line in open(
      os.path.join(workdir, workdir_lib.EVAL_DIR, workdir_lib.PREDICTIONS_FILE))]
  texts = [(r["text"],) for r in rows]
  ensemble_run = predict.Predictor.from_path(workdir, member="mean")
  logits = ensemble_run.logits(ensemble_run._tokenize(texts))
  assert_close(calibration.softmax(logits), mean, 1e-5)
  path = os.path.join(workdir, tuning.DECISIONS_FILE)
  saved = json.load(open(path))["steps"] if os.path.isfile(path) else {}
  # eval --member=mean saved what it fitted (if the run fits decisions), and predict uses it
  assert (tuning.ensemble_key(4) in saved) == (ensemble_run.decisions is not None)
  out = export.export(workdir, str(tmp_path / "mean"), member="mean")
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["model_type"] == hf.ENSEMBLE_MODEL_TYPE and config["num_members"] == 4
  assert json.load(open(os.path.join(out, export.METADATA_NAME)))["member"] == "mean"
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, trust_remote_code=True, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  enc = tokenizer([t for t, in texts[:16]], padding=True, truncation=True, max_length=64,
                  return_tensors="pt")
  with torch.no_grad():
    torch_logits = model.eval()(**enc).logits.numpy()
  assert_close(calibration.softmax(torch_logits), mean[:16], 1e-4)
  from_export = predict.Predictor.from_path(out)
  assert isinstance(from_export.params, runs.Members) and len(from_export.params.params) == 4
  assert_close(from_export.logits(from_export._tokenize(texts)), logits, 1e-5)
  assert from_export.predict([texts[0]])[0] == ensemble_run.predict([texts[0]])[0]
  with pytest.raises(UserError, match="ensemble exports as PyTorch weights only"):
    export.export(workdir, str(tmp_path / "mean8"), member="mean", quantize="int8")
  from flaxbert_cls.training import experiment  # pylint: disable=g-import-not-at-top
  config = small_config(out)
  with pytest.raises(UserError, match=r"an ensemble's export \(4 members averaged\) cannot "
                                      r"start a run; start from one member"):
    experiment.build_experiment(config)


def test_the_means_decisions_are_its_own_and_refused_until_eval_fits_them(tmp_path):
  """load_for: the mean reads decisions.json's mean@STEP (never a single run's), refused in
  one line before `eval --member=mean` saved it; a member reads the run's own by step."""
  import types  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.decisions import tuning  # pylint: disable=g-import-not-at-top
  config = config_lib.default_config()
  config.tune_thresholds = True
  task = types.SimpleNamespace(num_labels=2, task=types.SimpleNamespace(is_multilabel=False))
  run = lambda member: types.SimpleNamespace(  # pylint: disable=unnecessary-lambda-assignment
      tasks=[task], config=config, member=member, checkpoint_step=4)
  workdir = str(tmp_path)
  tuning.save(workdir, tuning.Decisions(threshold=0.7, step=4))  # a single run's, at step 4
  with pytest.raises(UserError, match="--member=mean --step=4` first") as e:
    tuning.load_for(run("mean"), workdir)
  assert "\n" not in str(e.value)
  tuning.save(workdir, tuning.Decisions(threshold=0.3, step=4), tuning.ensemble_key(4))
  assert tuning.load_for(run("mean"), workdir).threshold == 0.3
  assert tuning.load_for(run(0), workdir).threshold == 0.7
  config.tune_thresholds = False  # nothing to fit: argmax, nothing needed
  assert tuning.load_for(run("mean"), workdir) is None


def test_a_sweep_starts_from_a_previous_run_like_a_single_run(swept):
  """A workdir start loads one way: every member gets its weights, the head by label name."""
  config, workdir, _ = swept
  exp = experiment.build_experiment(config, devices=jax.devices()[:2])
  state, *_ = starts.create_train_state(exp, 4, workdir)
  start_exp, start_params = runs.load_run(workdir)  # the best member, as a start reads it
  assert exp.started_from["kind"] == "workdir"
  assert exp.started_from["head"]["kept"] == list(start_exp.label_names)
  members = traverse_util.flatten_dict(jax.device_get(state.params))
  for path, value in traverse_util.flatten_dict(jax.device_get(start_params)).items():
    stacked = members[path]
    assert stacked.shape == (len(exp.members), *value.shape), path
    for member in range(len(exp.members)):
      np.testing.assert_array_equal(stacked[member], value, err_msg=str(path))

