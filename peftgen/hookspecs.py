"""The hooks a peftgen plugin can implement. There is one.

from peftgen import hookimpl

@hookimpl
def register_decoders(register):
    register(MyDecoder)
"""

import pluggy

hookspec = pluggy.HookspecMarker("peftgen")
hookimpl = pluggy.HookimplMarker("peftgen")


@hookspec
def register_decoders(register):
    """Register decoding strategies, chosen at generation time with ``--decoder NAME``.

    :param register: call ``register(cls)`` once per decoder class: a subclass of
        ``peftgen.TokenDecoder`` (picks one token per step) or ``peftgen.SequenceDecoder``
        (drives the engine through what ``peftgen.DecodingEngine`` lists, e.g. beam search)
        whose ``name`` no other plugin uses.
    """
