"""A single sequence streams: each token's text is printed as soon as it is complete; a
finished completion's text leaves out the stop token that ended it, and only that."""

from transformers import AutoModelForCausalLM, AutoTokenizer

from peftgen import Completion
from peftgen.decoders.topk import TopK
from peftgen.generation import generate
from peftgen.generation.text import Streamer, completion_text, text_ids


def test_streamed_pieces_add_up_to_the_text_and_hold_back_split_characters(gpt2_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    text = "The sea 😀 was calm. Ünïcode too."
    ids = tokenizer.encode(text)
    emoji_tokens = tokenizer.encode(" 😀")
    assert len(emoji_tokens) > 1  # the emoji's bytes span tokens: a token alone is half a character
    streamer = Streamer(tokenizer, stop_ids=[tokenizer.eos_token_id])
    pieces = [streamer.push(token) for token in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # held back while the emoji was incomplete
    assert sum(1 for piece in pieces if piece) > len(ids) // 2  # and otherwise printed token by token


def test_nothing_streams_from_the_stop_token_on(gpt2_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    streamer = Streamer(tokenizer, stop_ids=[tokenizer.eos_token_id])
    words = tokenizer.encode(" one two")
    assert streamer.push(words[0]) == " one"
    assert streamer.push(tokenizer.eos_token_id) == ""
    assert streamer.push(words[1]) == ""


def test_tokens_reach_the_caller_while_generation_is_still_running(tiny_gpt2):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    forwards, seen = [], []
    hook = model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        result = generate(model, [[50256]], TopK(), max_new_tokens=6, seed=0, on_token=lambda step, tokens: seen.append((step, int(tokens[0]), len(forwards))))
    finally:
        hook.remove()
    assert [(step, token) for step, token, _ in seen] == list(enumerate(result[0][0].token_ids))
    assert [count for *_, count in seen] == [1, 2, 3, 4, 5, 6]  # token t arrives after forward t + 1, not at the end


def test_completion_text_leaves_out_the_stop_token_that_ended_it_and_nothing_else(gpt2_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    words, eos = tokenizer.encode(" one two"), tokenizer.eos_token_id
    stopped = Completion(words + [eos], "stop")
    assert text_ids(stopped) == words and completion_text(tokenizer, stopped) == " one two"
    # Ended by the length limit, the last token is text, even a special one (eos was no stop token here).
    cut = Completion(words + [eos], "length")
    assert text_ids(cut) == words + [eos] and completion_text(tokenizer, cut) == " one two<|endoftext|>"
    assert stopped.token_ids == words + [eos]  # the completion itself is left as it is
