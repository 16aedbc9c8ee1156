"""What `predict` writes per row: CSV (text columns, label, p_<label>... or score) or JSON
Lines (the same as objects), as text; one function for a whole file and a pod's parts, so the
parts concatenated are the one-process file byte for byte (a CSV part has its own header).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Sequence


def header_text(path: str, text_fields: Sequence[str], label_names: tuple[str, ...] | None
                ) -> str:
  """A .csv output's first line (text columns, label, p_<label>... or score); '' for .jsonl."""
  if not path.lower().endswith(".csv"):
    return ""
  tail = ["score"] if label_names is None else ["label"] + [f"p_{n}" for n in label_names]
  return _csv_text([list(text_fields) + tail])


def results_text(path: str, text_fields: Sequence[str], label_names: tuple[str, ...] | None,
                 texts: Sequence[tuple[str, ...]], results: list[dict[str, Any]]) -> str:
  """Rows of a .csv or .jsonl output (by `path`'s extension), as they are written."""
  if not path.lower().endswith(".csv"):
    return "".join(json.dumps(dict(zip(text_fields, row)) | r, ensure_ascii=False) + "\n"
                   for row, r in zip(texts, results))
  rows = []
  for row, r in zip(texts, results):
    label = "|".join(r["label"]) if isinstance(r.get("label"), list) else r.get("label")
    values = ([r["score"]] if label_names is None else
              [label] + [r["probabilities"][n] for n in label_names])
    rows.append(list(row) + values)
  return _csv_text(rows)


def _csv_text(rows: list[list[Any]]) -> str:
  out = io.StringIO(newline="")
  csv.writer(out).writerows(rows)
  return out.getvalue()
