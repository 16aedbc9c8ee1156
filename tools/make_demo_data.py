r"""Makes the demo data in examples/data/sst2 from a GLUE SST-2 directory.

train.tsv: the header line and `--num_train` rows of GLUE SST-2 train, drawn
without replacement with `random.Random(--seed)` and kept in the drawn
(shuffled) order. Each row is copied byte for byte.
dev.tsv: GLUE SST-2 dev, copied byte for byte.

  python tools/make_demo_data.py [--sst2_dir=DIR] --out_dir=examples/data/sst2

Fresh rows for re-fine-tuning the demo model (docs/training.md): rows the demo never saw, i.e.
whose bytes are not in `--exclude` (the demo's train.tsv); only train.tsv is written:

  python tools/make_demo_data.py --out_dir=workdirs/sst2_unseen --seed=1 \
    --exclude=examples/data/sst2/train.tsv

--sst2_dir defaults to $FLAXBERT_DATA/glue/SST-2, else ../shared/data/glue/SST-2
beside the repository.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import shutil

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import common  # noqa: E402  (benchmarks/common.py: the repository on sys.path, the data folder)


def sample_rows(train_bytes: bytes, num_rows: int, seed: int,
                exclude: frozenset[bytes] = frozenset()) -> bytes:
  """Header + `num_rows` sampled rows, each with its own bytes and a '\\n'.

  Rows in `exclude` (exact bytes) are never drawn.
  """
  lines = train_bytes.split(b'\n')
  if lines[-1] == b'':
    lines.pop()
  header, rows = lines[0], [row for row in lines[1:] if row not in exclude]
  if num_rows > len(rows):
    raise SystemExit(f'asked for {num_rows} rows, the file has {len(rows)}')
  # random.sample returns the picks in random order: the file is shuffled.
  picked = random.Random(seed).sample(range(len(rows)), num_rows)
  return b'\n'.join([header] + [rows[i] for i in picked]) + b'\n'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sst2_dir', default=os.path.join(common.data_dir(), 'glue', 'SST-2'),
                      help='GLUE SST-2 directory holding train.tsv, dev.tsv')
  parser.add_argument('--out_dir', default='examples/data/sst2')
  parser.add_argument('--num_train', type=int, default=8000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--exclude', default='',
                      help='a TSV whose rows are not drawn (then only train.tsv is written)')
  args = parser.parse_args()
  exclude = frozenset()
  if args.exclude:
    with open(args.exclude, 'rb') as f:
      exclude = frozenset(f.read().split(b'\n')[1:])

  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.sst2_dir, 'train.tsv'), 'rb') as f:
    sample = sample_rows(f.read(), args.num_train, args.seed, exclude)
  with open(os.path.join(args.out_dir, 'train.tsv'), 'wb') as f:
    f.write(sample)
  if exclude:
    print(f'wrote {args.num_train} train rows (seed {args.seed}) not in {args.exclude} '
          f'to {args.out_dir}')
    return
  shutil.copyfile(os.path.join(args.sst2_dir, 'dev.tsv'),
                  os.path.join(args.out_dir, 'dev.tsv'))
  print(f'wrote {args.num_train} train rows (seed {args.seed}) and dev.tsv '
        f'to {args.out_dir}')


if __name__ == '__main__':
  main()
