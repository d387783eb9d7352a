"""Placeholder: replaced by the module that implements these commands."""


def prepare() -> None:
    """Prepare data (not yet implemented)."""
    raise NotImplementedError
