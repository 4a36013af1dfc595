"""The one exception type for mistakes a user can cause (bad data, wrong config, missing file).

The CLI catches it and prints its message without a traceback; everything else is a bug and
keeps its traceback.
"""


class VlmtuneError(Exception):
    """A problem the user can fix. The message names the file, record or line, and what to do."""
