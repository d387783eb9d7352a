"""The one exception type peftgen raises for problems a user can fix."""


class PeftgenError(Exception):
    """A problem with the user's input, environment or files.

    The message says what was wrong, the offending value, and how to fix it.
    The CLI prints it as ``Error: <message>`` and exits with code 1, without a
    traceback. Programmer bugs raise ordinary exceptions instead.
    """
