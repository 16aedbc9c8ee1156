"""The one exception type for bad user input: the CLI prints it as one line and exits 2."""


class UserError(Exception):
  """Bad input (file, column, label, config key, checkpoint...). The message names where."""


class Preempted(Exception):
  """The run saved a checkpoint after SIGTERM / a preemption notice and stopped."""


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL, "try again": schedulers may requeue on it


def one_line(e: BaseException, limit: int = 300) -> str:
  """An exception as one line (its type and message, whitespace folded) for a log or error."""
  return " ".join(f"{type(e).__name__}: {e}".split())[:limit]
