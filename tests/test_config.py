"""The config's one home: defaults, a saved run's config read back over them, the reference page."""

import json
import pathlib

import pytest

from flaxbert_cls import config as config_lib
from flaxbert_cls import config_reference
from flaxbert_cls import saved_config
from flaxbert_cls.errors import UserError

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def _saved(config) -> dict:
  return json.loads(config.to_json())


def test_an_older_run_missing_keys_reads_back_with_todays_defaults(tmp_path):
  config = config_lib.default_config()
  config.learning_rate = 3e-4
  config.seq_buckets = (16, 32)
  saved = _saved(config)
  for key in ("pooling", "report_to", "long_document", "window_pooling", "sweep", "baseline"):
    del saved[key]  # keys added after the first release
  (tmp_path / "config.json").write_text(json.dumps(saved))
  loaded = saved_config.load_saved(str(tmp_path))
  assert loaded.learning_rate == 3e-4
  assert loaded.seq_buckets == (16, 32)  # JSON's list back as the default's tuple
  defaults = config_lib.default_config()
  for key in ("pooling", "report_to", "long_document", "window_pooling", "baseline"):
    assert loaded[key] == defaults[key], key
  assert config_lib.grid(loaded) == []  # the sweep keys are there, empty
  config_lib.validate(loaded)


def test_a_saved_run_reads_back_as_it_was_saved():
  config = config_lib.default_config()
  config.sweep.learning_rate = (1e-5, 2e-5)
  config.tune_thresholds = True
  loaded = saved_config.from_saved(_saved(config))
  assert loaded.to_dict() == config.to_dict()


def test_unknown_keys_and_wrong_types_are_refused_by_name(tmp_path):
  with pytest.raises(UserError, match=r"run/config.json: unknown key 'learning_rat'"):
    saved_config.from_saved({"learning_rat": 1e-4}, "run/config.json")
  with pytest.raises(UserError, match=r"run/config.json: .*'batch_size'"):
    saved_config.from_saved({"batch_size": "many"}, "run/config.json")
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(UserError, match=r"config.json: not valid JSON"):
    saved_config.load_saved(str(tmp_path))
  with pytest.raises(UserError, match=r"not a flaxbert-cls workdir \(no config.json\)"):
    saved_config.load_saved(str(tmp_path / "missing"))


def test_the_config_reference_page_matches_default_config():
  page = (DOCS / "config.md").read_text()
  assert page == config_reference.render(), (
      "docs/config.md is stale: python -m flaxbert_cls.config_reference > docs/config.md")
  for key in config_lib.default_config().keys():
    assert f"| `{key}` |" in page
