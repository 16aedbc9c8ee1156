"""Tokenize once: ragged token ids per split, cached on disk, shared across processes.

Examples are tokenized without padding (the Rust tokenizer's batch encoding, large
batches, straight into flat arrays) and kept ragged: row i is flat[offsets[i]:
offsets[i+1]]. The cache is keyed by a content hash of texts and labels plus the
tokenizer and length; with several processes each tokenizes a disjoint part and all
read the merged arrays, so every process holds the same split (batches stay identical
for any process count).

Texts longer than max_seq_length follow a `Layout`: 'truncate' (the first tokens),
'head_tail' (the first and the last tokens) or 'windows' (several rows per document,
[CLS] chunk [SEP] each, grouped by `TokenizedSplit.documents`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from flaxbert_cls.errors import UserError

log = logging.getLogger(__name__)

LONG_DOCUMENT_KEYS = ("long_document", "head_tokens", "window_stride", "max_windows")
LONG_DOCUMENT_MODES = ("truncate", "head_tail", "windows")


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a text becomes model rows: 'truncate', 'head_tail' or 'windows' (config keys)."""

  long_document: str = "truncate"
  head_tokens: int = -1  # head_tail: -1 = Sun et al.'s 128 of 510, scaled to the row
  window_stride: int = 64
  max_windows: int = 1

  @classmethod
  def from_export(cls, fields: dict[str, Any]) -> "Layout":
    """An export's config.json layout; exports without these keys (any HF model) truncate."""
    return cls(**{k: fields.get(k, getattr(cls, k)) for k in LONG_DOCUMENT_KEYS})

  def head_size(self, width: int) -> int:
    """Tokens kept from the start of a `width`-token row (head_tail)."""
    return self.head_tokens if self.head_tokens >= 0 else round(width * 128 / 510)


TRUNCATE = Layout()


def validate_layout(layout: Layout, max_seq_length: int,
                    check: Callable[[bool, str, str], None]) -> None:
  """config.validate's checks of the long_document keys (`check(ok, key, why)` raises the
  one-line error naming the key)."""
  check(layout.long_document in LONG_DOCUMENT_MODES, "long_document",
        f"use one of {LONG_DOCUMENT_MODES}")
  content = max_seq_length - 2  # every layout row is [CLS] content [SEP]
  if layout.long_document == "head_tail":
    check(layout.head_tokens == -1 or 0 <= layout.head_tokens < content, "head_tokens",
          f"must be -1 (auto) or in [0, max_seq_length - 2 = {content}): the head must leave "
          "room for the tail")
  if layout.long_document == "windows":
    check(1 <= layout.window_stride <= content, "window_stride",
          f"must be in [1, max_seq_length - 2 = {content}] (windows of max_seq_length="
          f"{max_seq_length} hold {content} text tokens; a larger stride skips text)")
    check(layout.max_windows >= 1, "max_windows", "must be >= 1")


@dataclasses.dataclass
class TokenizedSplit:
  """Ragged token ids: row i is flat[offsets[i]:offsets[i+1]].

  One row per example, except with windows: document d is rows documents[d]:
  documents[d+1], and `len`, `labels` and `document_lengths` count documents.
  """

  input_ids: np.ndarray  # int32 [total_tokens]
  token_type_ids: np.ndarray  # int8 [total_tokens]
  offsets: np.ndarray  # int64 [rows + 1]
  labels: np.ndarray | None  # int32 (classes) or float32 (regression), [n]
  num_truncated: int = 0
  content_hash: str = ""  # of the texts and labels (`content_hash`); resume checks it
  documents: np.ndarray | None = None  # int64 [n + 1] row offsets; None: row i is example i

  def __len__(self) -> int:
    return len(self.offsets if self.documents is None else self.documents) - 1

  @property
  def lengths(self) -> np.ndarray:
    """Tokens per row (per window with windows)."""
    return np.diff(self.offsets)

  def labels_at(self, rows: np.ndarray) -> np.ndarray:
    """The labels of examples `rows` (any shape; multi-hot rows add their axis); an index of
    -1 (padding) gets zeros."""
    real = rows >= 0
    labels = self.labels[np.where(real, rows, 0)]
    real = real.reshape(*rows.shape, *[1] * (labels.ndim - rows.ndim))
    return np.where(real, labels, 0).astype(self.labels.dtype)

  @property
  def window_counts(self) -> np.ndarray:
    """Rows per example: 1 each, except with windows."""
    if self.documents is None:
      return np.ones(len(self), np.int64)
    return np.diff(self.documents)

  @property
  def document_lengths(self) -> np.ndarray:
    """Tokens per example, all its windows together: what batches are grouped by."""
    if self.documents is None:
      return self.lengths
    return np.diff(self.offsets[self.documents])


def _rust_tokenizer(tokenizer: Any, max_seq_length: int | None) -> Any:
  """A copy of a fast tokenizer's Rust backend, set up as `tokenizer(..., truncation=...)` sets
  it (max_seq_length None: no truncation); None for a slow (Python) tokenizer."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None or not getattr(tokenizer, "is_fast", False):
    return None
  import tokenizers  # pylint: disable=g-import-not-at-top
  # A copy: the caller's tokenizer keeps its own truncation and padding settings.
  rust = tokenizers.Tokenizer.from_str(backend.to_str())
  if max_seq_length is None:
    rust.no_truncation()
  else:
    rust.enable_truncation(max_seq_length, stride=0, strategy="longest_first",
                           direction=getattr(tokenizer, "truncation_side", "right"))
  rust.no_padding()
  return rust


def tokenize(tokenizer: Any, texts: Sequence[tuple[str, ...]], labels: np.ndarray | None,
             max_seq_length: int, layout: Layout = TRUNCATE, chunk: int = 65536
             ) -> TokenizedSplit:
  """Fast-tokenizes single sentences or pairs ([CLS] a [SEP] b [SEP]), truncating to fit

  (or as `layout` says: head_tail, windows; single texts only).

  Calls the Rust tokenizer's batch encoding directly, in large chunks: it runs on all
  cores (unless TOKENIZERS_PARALLELISM=false) and skips the per-row Python dicts of
  `tokenizer(...)`; the ids are the same (tests/test_tokenize.py).
  """
  if layout.long_document != "truncate":
    return _long_layout(tokenizer, texts, labels, max_seq_length, layout, chunk)
  ids, types, lengths = _encode(tokenizer, texts, max_seq_length, True, chunk)
  return _from_lengths(ids, types, lengths, labels, max_seq_length)


def _encode(tokenizer: Any, texts: Sequence[tuple[str, ...]], max_seq_length: int | None,
            add_special_tokens: bool, chunk: int
            ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
  """(flat ids chunks, flat type id chunks, row lengths); max_seq_length None: no truncation."""
  rust = _rust_tokenizer(tokenizer, max_seq_length)
  if rust is None:
    return _encode_python(tokenizer, texts, max_seq_length, add_special_tokens)
  encode = getattr(rust, "encode_batch_fast", rust.encode_batch)  # fast: no char offsets
  lengths = np.zeros(len(texts), np.int64)
  ids, types = [], []
  for start in range(0, len(texts), chunk):
    part = texts[start:start + chunk]
    pairs = bool(part) and len(part[0]) > 1
    encodings = encode([(t[0], t[1]) for t in part] if pairs else [t[0] for t in part],
                       add_special_tokens=add_special_tokens)
    n = np.fromiter((len(e.ids) for e in encodings), np.int64, count=len(encodings))
    lengths[start:start + len(n)] = n
    total = int(n.sum())
    # One flat array per chunk, straight from the encodings: no per-row NumPy arrays.
    ids.append(np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings),
                           np.int32, count=total))
    types.append(np.fromiter(itertools.chain.from_iterable(e.type_ids for e in encodings),
                             np.int8, count=total))
  return ids, types, lengths


def _from_lengths(ids: list[np.ndarray], types: list[np.ndarray], lengths: np.ndarray,
                  labels: np.ndarray | None, max_seq_length: int,
                  num_truncated: int | None = None,
                  window_counts: np.ndarray | None = None) -> TokenizedSplit:
  offsets = np.zeros(len(lengths) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  documents = None
  if window_counts is not None:
    documents = np.zeros(len(window_counts) + 1, np.int64)
    np.cumsum(window_counts, out=documents[1:])
  if num_truncated is None:
    # A row at exactly max length was (almost always) cut: count it so the log says so.
    num_truncated = int(np.count_nonzero(lengths >= max_seq_length))
  empty = np.zeros(0, np.int32)
  return TokenizedSplit(np.concatenate(ids) if ids else empty,
                        np.concatenate(types) if types else empty.astype(np.int8),
                        offsets, labels, num_truncated, documents=documents)


def _tokenize_python(tokenizer: Any, texts: Sequence[tuple[str, ...]],
                     labels: np.ndarray | None, max_seq_length: int) -> TokenizedSplit:
  """`tokenize` through `tokenizer(...)` (truncate layout): the Rust path's reference."""
  ids, types, lengths = _encode_python(tokenizer, texts, max_seq_length, True)
  return _from_lengths(ids, types, lengths, labels, max_seq_length)


def _encode_python(tokenizer: Any, texts: Sequence[tuple[str, ...]], max_seq_length: int | None,
                   add_special_tokens: bool, chunk: int = 4096
                   ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
  """`_encode` through `tokenizer(...)`: for tokenizers without a Rust backend."""
  ids, types, lengths = [], [], []
  for start in range(0, len(texts), chunk):
    part = texts[start:start + chunk]
    first = [t[0] for t in part]
    second = [t[1] for t in part] if part and len(part[0]) > 1 else None
    enc = tokenizer(first, second, add_special_tokens=add_special_tokens,
                    truncation="longest_first" if max_seq_length else False,
                    max_length=max_seq_length, return_attention_mask=False,
                    return_token_type_ids=True, return_overflowing_tokens=False,
                    return_length=False, verbose=False)
    for row_ids, row_types in zip(enc["input_ids"], enc["token_type_ids"]):
      ids.append(np.asarray(row_ids, np.int32))
      types.append(np.asarray(row_types, np.int8))
      lengths.append(len(row_ids))
  return ids, types, np.asarray(lengths, np.int64)


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
  """(ids before, ids after) the text of one single-text row: ([CLS], [SEP]) for BERT."""
  text = tokenizer("a", add_special_tokens=False)["input_ids"]
  row = tokenizer("a", add_special_tokens=True)["input_ids"]
  at = next(i for i in range(len(row)) if row[i:i + len(text)] == text)
  return row[:at], row[at + len(text):]


def _long_layout(tokenizer: Any, texts: Sequence[tuple[str, ...]], labels: np.ndarray | None,
                 max_seq_length: int, layout: Layout, chunk: int) -> TokenizedSplit:
  """head_tail or windows rows, cut from each text's whole token sequence (no truncation)."""
  if texts and len(texts[0]) > 1:
    raise UserError(f"config.long_document={layout.long_document!r}: single-text tasks only "
                    "(which text of a sentence pair would the windows cut?); use 'truncate'")
  ids, _, lengths = _encode(tokenizer, texts, None, False, chunk)
  flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
  starts = np.concatenate([[0], np.cumsum(lengths)])
  before, after = (np.asarray(x, np.int32) for x in special_tokens(tokenizer))
  width = max_seq_length - len(before) - len(after)  # text tokens per row
  rows, counts, cut = [], np.ones(len(texts), np.int64), 0
  for i, n in enumerate(lengths):
    text = flat[starts[i]:starts[i] + n]
    if layout.long_document == "head_tail":
      head = layout.head_size(width)
      pieces = [text if n <= width else np.concatenate([text[:head], text[n - (width - head):]])]
      cut += int(n > width)
    else:  # windows: starts 0, stride, 2*stride, ... until one reaches the end
      needed = 1 + max(0, -(-(n - width) // layout.window_stride))
      counts[i] = min(needed, layout.max_windows)
      pieces = [text[k * layout.window_stride:k * layout.window_stride + width]
                for k in range(counts[i])]
      cut += int(needed > layout.max_windows)
    rows += [np.concatenate([before, piece, after]) for piece in pieces]
  row_lengths = np.fromiter((len(r) for r in rows), np.int64, count=len(rows))
  return _from_lengths(rows, [np.zeros(len(r), np.int8) for r in rows], row_lengths, labels,
                       max_seq_length, cut,
                       counts if layout.long_document == "windows" else None)


def content_hash(texts: Sequence[tuple[str, ...]], labels: np.ndarray | None) -> str:
  """A short hash of the rows' texts and labels: same data, same hash, whichever file."""
  h = hashlib.sha256()
  for row in texts:
    h.update("\x1f".join(row).encode("utf-8", "surrogatepass"))
    h.update(b"\x1e")
  if labels is not None:
    h.update(np.ascontiguousarray(labels).tobytes())
  return h.hexdigest()[:24]


def cached_tokenize(tokenizer: Any, texts: Sequence[tuple[str, ...]], labels: np.ndarray | None,
                    max_seq_length: int, cache_dir: str | None,
                    layout: Layout = TRUNCATE) -> TokenizedSplit:
  """`tokenize`, memoized on disk by a hash of texts, labels, tokenizer vocab, length and layout.

  With several processes and a `cache_dir`, process i tokenizes rows [i*n/P, (i+1)*n/P)
  into a part file of the cache and every process then reads all parts: the result is
  the same whole split as on one process, in 1/P of the time (`_tokenize_shared`).
  """
  data = content_hash(texts, labels)
  if not cache_dir:
    return dataclasses.replace(tokenize(tokenizer, texts, labels, max_seq_length, layout),
                               content_hash=data)
  h = hashlib.sha256()
  h.update(repr((type(tokenizer).__name__, len(tokenizer), tokenizer.name_or_path,
                 max_seq_length)).encode())
  if layout != TRUNCATE:  # truncation keeps its old keys: existing caches stay valid
    h.update(repr(layout).encode())
  h.update(repr(sorted(tokenizer.get_vocab().items())[:64]).encode())
  h.update(data.encode())
  path = os.path.join(cache_dir, f"tok-{h.hexdigest()[:24]}.npz")
  split = _load_cache(path, data)
  if jax.process_count() > 1:
    # All processes must take the same branch (the shared one has barriers): a hit on every one.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    hits = multihost_utils.process_allgather(np.int32(split is not None))
    if not np.all(hits):
      split = _tokenize_shared(tokenizer, texts, labels, max_seq_length, path, layout)
  elif split is None:
    split = tokenize(tokenizer, texts, labels, max_seq_length, layout)
    _save_cache(path, split)
  return dataclasses.replace(split, content_hash=data)


def _load_cache(path: str, data: str) -> TokenizedSplit | None:
  if not os.path.isfile(path):
    return None
  try:
    with np.load(path) as z:
      return TokenizedSplit(z["input_ids"], z["token_type_ids"], z["offsets"],
                            z["labels"] if "labels" in z else None, int(z["num_truncated"]),
                            data, z["documents"] if "documents" in z else None)
  except Exception as e:  # pylint: disable=broad-except  (a bad cache is rebuilt, not fatal)
    log.warning("Ignoring unreadable token cache %s: %s", path, e)
    return None


def _save_cache(path: str, split: TokenizedSplit) -> None:
  """Writes `split` to `path` atomically: a concurrent reader never sees half a file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  arrays = dict(input_ids=split.input_ids, token_type_ids=split.token_type_ids,
                offsets=split.offsets, num_truncated=np.asarray(split.num_truncated))
  for key in ("labels", "documents"):
    if getattr(split, key) is not None:
      arrays[key] = getattr(split, key)
  # Unique per host too: on a shared file system two hosts' writers can share a pid.
  tmp = f"{path}.{jax.process_index()}.{os.getpid()}.tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _tokenize_shared(tokenizer: Any, texts: Sequence[tuple[str, ...]],
                     labels: np.ndarray | None, max_seq_length: int, path: str,
                     layout: Layout = TRUNCATE) -> TokenizedSplit:
  """Each process tokenizes its 1/P of the rows into `path`'s part files; all read all parts.

  Rows are split by position only, so the merged split is exactly `tokenize`'s on one
  process. A part another process wrote but this one cannot see (a `cache_dir` that is
  not shared between hosts) is tokenized here: slower, never different.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  me, count, n = jax.process_index(), jax.process_count(), len(texts)
  bounds = [i * n // count for i in range(count + 1)]
  part_path = [f"{path[:-len('.npz')]}.part{i}of{count}.npz" for i in range(count)]
  start, stop = bounds[me], bounds[me + 1]
  mine = tokenize(tokenizer, texts[start:stop], None, max_seq_length, layout)
  log.info("Process %d tokenized rows [%d, %d) of %d: %d rows", me, start, stop, n, stop - start)
  _save_cache(part_path[me], mine)
  multihost_utils.sync_global_devices(f"tokenized {os.path.basename(path)}")
  parts = []
  for i in range(count):
    part = mine if i == me else _load_cache(part_path[i], "")
    if part is None:
      log.warning("Token cache part %s not found (cache_dir not shared by the hosts?): "
                  "tokenizing rows [%d, %d) here", part_path[i], bounds[i], bounds[i + 1])
      part = tokenize(tokenizer, texts[bounds[i]:bounds[i + 1]], None, max_seq_length, layout)
    parts.append(part)
  split = _from_lengths([p.input_ids for p in parts], [p.token_type_ids for p in parts],
                        np.concatenate([p.lengths for p in parts]), labels, max_seq_length,
                        sum(p.num_truncated for p in parts),
                        None if parts[0].documents is None
                        else np.concatenate([p.window_counts for p in parts]))
  if me == 0:
    _save_cache(path, split)
  # Parts are removed only once every process has read them.
  multihost_utils.sync_global_devices(f"merged {os.path.basename(path)}")
  os.remove(part_path[me])
  return split
