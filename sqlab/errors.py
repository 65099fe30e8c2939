"""The one exception type sqlab raises for bad input.

Raised where bad input enters (a config field, a file, a model spec, a dataset
name); the message names the offending value and says what is accepted. The CLI
prints it as one line instead of a traceback.
"""


class SqlabError(ValueError):
    """Bad input or an unusable environment, explained in the message."""
