"""Errors qtc reports to users.

A `QtcError` is a problem with the user's input (a file, a recipe, an option): the CLI prints its message on
one line and exits with code 2. Anything else that escapes is a bug in qtc and exits with code 1.
"""


class QtcError(Exception):
    """Bad input: the message names the problem in one line."""
