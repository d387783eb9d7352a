"""The marker tokens peftgen adds to a model for training: where an example begins, where it ends, padding.

They are the defaults of ``bos_token``, ``eos_token`` and ``pad_token``; a
run may choose others, and its saved tokenizer then holds those.
"""

BOS = "<BOS>"
EOS = "<EOS>"
PAD = "<PAD>"
MARKERS = (BOS, EOS, PAD)  # the order add_special_tokens and load(special_tokens=...) take them in
