"""The one error type for a mistake a user can fix (a path, a flag, a module, the data).

Every command shows it as one line on stderr and exits with status 2. It lives here, beside the
dataset contracts, because both halves raise it: the Beam pipelines and the trainer (which must
not import Beam).
"""


class UserError(Exception):
  """A problem the user can fix (bad path, flag or data): shown as one line, exit status 2."""


class InternalError(Exception):
  """A failure of this project itself, not of the user's input: shown as one line that says so
  and where its traceback was kept, exit status 1. Its message says where the traceback is."""
