"""Placeholder: replaced by the module that implements these commands."""


def generate() -> None:
    """Generate text (not yet implemented)."""
    raise NotImplementedError


def decoders() -> None:
    """List decoders (not yet implemented)."""
    raise NotImplementedError
