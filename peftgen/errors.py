"""The one exception type peftgen raises for problems a user can fix."""


class PeftgenError(Exception):
    """A problem with the user's input, environment or files.

    The message says what was wrong, the offending value, and how to fix it.
    The CLI prints it as ``Error: <message>`` and exits with code 1, without a
    traceback. Programmer bugs raise ordinary exceptions instead.
    """


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message (its type's name if it has none), for one-line messages."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]
