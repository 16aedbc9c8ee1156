"""The one exception type for bad user input: the CLI prints it as one line and exits 2."""


class UserError(Exception):
  """Bad input (file, column, label, config key, checkpoint...). The message names where."""
