"""Command-line handling the launchers share: `launcher [options] [-- trainer arguments]`."""

from __future__ import annotations

import argparse


def parser(doc: str) -> argparse.ArgumentParser:
  """An argument parser whose description is the first line of the launcher's docstring."""
  return argparse.ArgumentParser(description=doc.split("\n")[0],
                                 epilog="Arguments after -- go to `flaxbert-cls train`.")


def parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
  """Parses the launcher's own options; what follows `--` lands in `args.train_args`."""
  train_args: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, train_args = argv[:i], argv[i + 1:]
  args = p.parse_args(argv)
  if {"--dry-run", "--dry_run"} & set(train_args):
    p.error("--dry-run goes before --: after it, arguments belong to the trainer")
  args.train_args = train_args
  return args
