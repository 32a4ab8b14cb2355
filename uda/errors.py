"""The one base class of mistakes a user can make and fix.

Entry points print a ``UserError`` as one clear message and exit non-zero,
without a traceback; anything else is a bug and keeps its traceback.
Modules define their own subclasses (e.g. ``ConfigError``) next to the code
that raises them.
"""


class UserError(Exception):
    """A predictable mistake in the input: say what was wrong and how to fix it."""
