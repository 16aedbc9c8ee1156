"""The TF-IDF baseline beside a run: its scores in the log, metrics.jsonl, eval and report."""

import json
import logging
import os

import numpy as np
import pytest
from sklearn import feature_extraction, linear_model
from sklearn import metrics as skm

from flaxbert_cls.config import validate
from flaxbert_cls.data import readers
from flaxbert_cls.data import tasks as tasks_lib
from flaxbert_cls.decisions import baseline
from flaxbert_cls.decisions import blend
from flaxbert_cls.errors import UserError
from flaxbert_cls.report import page
from flaxbert_cls.training import evaluate
from flaxbert_cls.training import train
from model_fixtures import DEMO_DATA, make_tiny_checkpoint
from model_fixtures import small_config


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


def _sklearn_fit(rows: np.ndarray) -> tuple[float, np.ndarray]:
  """TF-IDF + logistic regression written out with scikit-learn alone, on the demo data:
  its dev accuracy and dev probabilities."""
  def read(name):
    lines = open(os.path.join(DEMO_DATA, name)).read().splitlines()[1:]
    texts, labels = zip(*(line.rsplit("\t", 1) for line in lines))
    return list(texts), np.array(labels, int)
  train_texts, train_labels = read("train.tsv")
  dev_texts, dev_labels = read("dev.tsv")
  vectorizer = feature_extraction.text.TfidfVectorizer(
      ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=200_000, dtype=np.float32)
  x = vectorizer.fit_transform([train_texts[i] for i in rows])
  model = linear_model.LogisticRegression(C=4.0, max_iter=1000, random_state=42)
  model.fit(x, train_labels[rows])
  probabilities = model.predict_proba(vectorizer.transform(dev_texts))
  return float(skm.accuracy_score(dev_labels, probabilities.argmax(-1))), probabilities


def test_run_shows_its_baseline_in_log_metrics_eval_and_report(tiny_checkpoint, tmp_path,
                                                               caplog):
  workdir = str(tmp_path / "run")
  config = small_config(tiny_checkpoint, num_train_steps=3, baseline="tfidf",
                        baseline_max_rows=6000)
  with caplog.at_level(logging.INFO):
    result = train.train_and_evaluate(config, workdir)
  # Capped: 6,000 of the demo's 8,000 rows, drawn with the run's seed (and the log says so).
  expected, probabilities = _sklearn_fit(baseline.sample_rows(8000, 6000, 42))
  assert "on 6000 training rows (sampled from 8000 with seed 42" in caplog.text
  assert result["eval"]["baseline/accuracy"] == pytest.approx(expected, rel=1e-9)
  record = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))][-1]
  assert record["baseline/accuracy"] == result["eval"]["baseline/accuracy"]
  assert "baseline/f1_macro" in record and "accuracy" in record
  eval_line = [r.message for r in caplog.records if r.message.startswith("eval at step 3")][0]
  assert f"baseline/accuracy {expected:.4f}" in eval_line
  saved = json.load(open(os.path.join(workdir, baseline.BASELINE_FILE)))
  assert saved["metrics"]["accuracy"] == record["baseline/accuracy"]
  # Its dev probabilities are kept for a blend with the run's (decisions/blend.py).
  np.testing.assert_allclose(baseline.validation_probabilities(workdir, 872), probabilities,
                             rtol=1e-5, atol=1e-6)
  assert baseline.validation_probabilities(workdir, 871) is None  # other rows: none
  # And the fitted pipeline itself, for new texts.
  dev_texts = [line.rsplit("\t", 1)[0] for line in
               open(os.path.join(DEMO_DATA, "dev.tsv")).read().splitlines()[1:]]
  np.testing.assert_allclose(
      baseline.model_probabilities(baseline.load_model(workdir), [(t,) for t in dev_texts], 2),
      probabilities, rtol=1e-5, atol=1e-6)

  # eval reads the saved scores (no refit); the report shows them in a row above the run's.
  results = evaluate.evaluate_workdir(workdir)
  assert results["baseline/accuracy"] == record["baseline/accuracy"]
  # And the blend with the run: its grid holds w = 0 (the baseline) and 1 (the run), so the
  # weight chosen on these rows scores at least as well as either there.
  assert results["blend/weight"] in blend.WEIGHTS
  assert results["blend/accuracy_tuned"] >= max(results["accuracy"], results["baseline/accuracy"])
  assert "blend/accuracy" in results
  html = open(page.write_report(workdir)).read()
  row = html[html.index('id="task-sst2-baseline"'):]
  assert row.index("TF-IDF") < row.index("this run, step 3")
  assert f"{expected:.4f}" in row[:row.index("</table>")]
  blended = row[row.index("blended (w="):row.index("</table>")]
  assert f"w={results['blend/weight']:.2f}" in blended
  assert f"{results['blend/accuracy']:.4f}" in blended

  # A resumed run reuses baseline.json: the same scores, said in the log, no refit.
  caplog.clear()
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(small_config(tiny_checkpoint, num_train_steps=5, baseline="tfidf",
                                          baseline_max_rows=6000), workdir)
  assert "scores from baseline.json" in caplog.text
  record = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))][-1]
  assert record["step"] == 5 and record["baseline/accuracy"] == pytest.approx(expected,
                                                                              rel=1e-9)


def _custom_data(tmp_path, texts, labels) -> tuple[str, str]:
  paths = []
  for name in ("train.tsv", "dev.tsv"):
    path = tmp_path / name
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    paths.append(str(path))
  return paths[0], paths[1]


def _custom_config(tiny_checkpoint, tmp_path, texts, labels, **overrides):
  train_file, dev_file = _custom_data(tmp_path, texts, labels)
  config = small_config(tiny_checkpoint, task_name="custom", train_file=train_file,
                        validation_file=dev_file, num_train_steps=2, batch_size=8,
                        eval_batch_size=8, **{"baseline": "tfidf", **overrides})
  config.text_columns = ("sentence",)
  config.label_column = "label"
  config.label_names = ("no", "yes")
  return config


def test_a_baseline_that_cannot_be_fitted_is_one_warning(tiny_checkpoint, tmp_path, caplog):
  # Words of one letter: TF-IDF (tokens of 2+ characters) finds no vocabulary.
  texts = [f"{'ab'[i % 2]} {'xyz'[i % 3]} !" for i in range(32)]
  config = _custom_config(tiny_checkpoint, tmp_path, texts, ["no", "yes"] * 16)
  with caplog.at_level(logging.INFO):
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
  warnings = [r for r in caplog.records if r.levelno >= logging.WARNING
              and r.name == baseline.__name__]
  assert len(warnings) == 1 and "baseline: not fitted (ValueError" in warnings[0].message
  assert result["step"] == 2 and "accuracy" in result["eval"]
  assert not any(k.startswith("baseline/") for k in result["eval"])
  assert not os.path.exists(tmp_path / "run" / baseline.BASELINE_FILE)


def test_baseline_none_turns_it_off(tiny_checkpoint, tmp_path):
  texts = [f"good movie number {i}" if i % 2 else f"bad film number {i}" for i in range(32)]
  config = _custom_config(tiny_checkpoint, tmp_path, texts, ["no", "yes"] * 16,
                          baseline="none")
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert "accuracy" in result["eval"]
  assert not any(k.startswith("baseline/") for k in result["eval"])
  assert not os.path.exists(tmp_path / "run" / baseline.BASELINE_FILE)
  record = json.loads(open(tmp_path / "run" / "metrics.jsonl").readlines()[-1])
  assert not any(k.startswith("baseline/") for k in record)


def _multilabel_examples(seed: int, n: int) -> readers.Examples:
  """Three labels, each signalled by its own words (and noise words), some rows with two."""
  rng = np.random.default_rng(seed)
  cues = (("joy", "glad"), ("anger", "furious"), ("fear", "scared"))
  texts, labels = [], np.zeros((n, 3), np.float32)
  for i in range(n):
    on = rng.random(3) < (0.5, 0.3, 0.1)
    labels[i] = on
    words = [w for j in np.flatnonzero(on) for w in cues[j] if rng.random() < 0.7]
    words += list(rng.choice(["the", "day", "was", "long", "then", "home"], 4))
    texts.append((" ".join(rng.permutation(words)),))
  return readers.Examples(texts, labels, f"synthetic{seed}", list(range(1, n + 1)))


def test_multilabel_baseline_tunes_per_label_thresholds():
  task = tasks_lib.Task("custom", ("text",), "labels", ("joy", "anger", "fear"),
                        metrics=("f1_macro", "f1_micro"), main_metric="f1_macro",
                        problem_type=tasks_lib.MULTI_LABEL)
  train_rows, dev_rows = _multilabel_examples(0, 400), _multilabel_examples(1, 200)
  config = small_config("unused", task_name="custom")
  tuned = baseline.fit_and_score(train_rows, dev_rows, task, config, 3)
  assert set(tuned) == {"f1_macro", "f1_micro", "f1_macro_tuned", "f1_micro_tuned",
                        "f1_macro_cross_fitted"}
  # Each label's tuned threshold maximises its F1 on these rows: never below 0.5's; each half
  # cut at the other half's thresholds is below that optimum.
  assert tuned["f1_macro_tuned"] >= tuned["f1_macro"] > 0.5
  assert 0.5 < tuned["f1_macro_cross_fitted"] <= tuned["f1_macro_tuned"]
  config.tune_thresholds = False
  plain = baseline.fit_and_score(train_rows, dev_rows, task, config, 3)
  assert set(plain) == {"f1_macro", "f1_micro"}
  assert plain["f1_macro"] == tuned["f1_macro"]
  # Class weights (BCE pos_weight) weigh each label's positives: more of them predicted.
  weighted = baseline.fit_and_score(train_rows, dev_rows, task, config, 3, (2.0, 4.0, 9.0))
  assert weighted["f1_macro"] != plain["f1_macro"]


def test_binary_baseline_with_a_tuned_threshold_is_also_cross_fitted():
  """Spam-like rows (a rare class signalled by noisy cues): the tuned threshold's F1 on the
  rows it was tuned on, and each half cut at the other half's threshold (its unseen estimate)."""
  task = tasks_lib.Task("custom", ("text",), "label", ("ham", "spam"), metrics=("f1", "accuracy"),
                        main_metric="f1")
  rng = np.random.default_rng(0)

  def rows(n):
    labels = (rng.random(n) < 0.15).astype(np.int32)
    texts = [(" ".join([*(w for w in ("win", "prize", "free") if y and rng.random() < 0.6),
                        *rng.choice(["call", "me", "later", "ok", "free"], 4)]),) for y in labels]
    return readers.Examples(texts, labels, "synthetic", list(range(n)))
  config = small_config("unused", task_name="custom", tune_thresholds=True)
  out = baseline.fit_and_score(rows(400), rows(300), task, config, 2)
  assert {"f1", "f1_tuned", "f1_cross_fitted", "accuracy_tuned"} <= set(out)
  assert out["f1_tuned"] >= out["f1"] and 0.3 < out["f1_cross_fitted"] <= out["f1_tuned"]
  config.tune_thresholds = False
  assert "f1_cross_fitted" not in baseline.fit_and_score(rows(400), rows(300), task, config, 2)


def test_regression_baseline_is_ridge():
  task = tasks_lib.Task("custom", ("text",), "score", None, is_regression=True,
                        metrics=("pearson", "spearmanr"), main_metric="pearson")
  rng = np.random.default_rng(0)

  def rows(n):
    scores = rng.integers(0, 4, n)
    texts = [(" ".join(["great"] * s + list(rng.choice(["it", "was", "film", "ok"], 3))),)
             for s in scores]
    return readers.Examples(texts, scores.astype(np.float32), "synthetic", list(range(n)))
  out = baseline.fit_and_score(rows(300), rows(100), task, small_config("unused"), 1)
  assert out["pearson"] > 0.8


def test_two_text_tasks_join_their_texts():
  task = tasks_lib.Task("custom", ("a", "b"), "label", ("no", "yes"), metrics=("accuracy",))
  rng = np.random.default_rng(0)

  def rows(n):
    labels = rng.integers(0, 2, n)
    # The label is in the second text only: a baseline reading the first alone is at chance.
    texts = [(" ".join(rng.choice(["cats", "dogs", "rain", "sun"], 3)),
              " ".join(rng.choice(["agree", "fine", "sure"] if y else ["refuse", "never"], 2)))
             for y in labels]
    return readers.Examples(texts, labels.astype(np.int32), "pairs", list(range(n)))
  out = baseline.fit_and_score(rows(200), rows(100), task, small_config("unused"), 2)
  assert out["accuracy"] > 0.95


def test_sample_rows_is_seeded_and_in_file_order():
  rows = baseline.sample_rows(1000, 100, seed=3)
  assert len(set(rows.tolist())) == 100 and np.all(np.diff(rows) > 0) and rows.max() < 1000
  np.testing.assert_array_equal(rows, baseline.sample_rows(1000, 100, seed=3))
  assert not np.array_equal(rows, baseline.sample_rows(1000, 100, seed=4))
  np.testing.assert_array_equal(baseline.sample_rows(50, 100, seed=3), np.arange(50))


@pytest.mark.parametrize("key, value, message", [
    ("baseline", "bow", "config.baseline='bow': use one of ('tfidf', 'none')"),
    ("baseline_max_rows", 0, "config.baseline_max_rows=0: must be an integer >= 2"),
])
def test_config_errors_name_the_key(key, value, message):
  config = small_config("unused")
  config[key] = value
  with pytest.raises(UserError) as error:
    validate(config)
  assert str(error.value) == message
