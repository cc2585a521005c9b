"""The fake model's answer: the prompt restated with its word count, one token per word."""

from __future__ import annotations

from wattgate.fakemodel import QUOTED_WORDS, chat_prompt, pieces_for, reply_words, \
    responses_prompt


def test_the_reply_restates_the_prompt_and_counts_its_words():
    text = "".join(reply_words("  what is a   monthly cap? "))
    assert text.startswith("You wrote 5 words: “what is a monthly cap?”. I am")
    assert "".join(reply_words("hi")).startswith("You wrote 1 word: “hi”.")
    assert "".join(reply_words("")).startswith("You wrote nothing.")
    assert not text.endswith(" ")  # a whole sentence, not a piece of one


def test_a_long_prompt_is_counted_in_full_and_quoted_in_part():
    prompt = " ".join(f"w{i}" for i in range(100))
    text = "".join(reply_words(prompt))
    assert text.startswith("You wrote 100 words: “w0 w1") and f"w{QUOTED_WORDS}" not in text
    assert "…”" in text


def test_the_prompt_is_the_last_user_message_or_the_responses_input():
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "first"},
                         {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": [{"type": "text", "text": "second"},
                                                      {"type": "image_url", "image_url": {}}]}]}
    assert chat_prompt(body) == "second"
    assert chat_prompt({"messages": "junk"}) == ""
    assert responses_prompt({"input": "plain"}) == "plain"
    assert responses_prompt({"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "parts"}]}]}) == "parts"


def test_the_limit_cuts_the_reply_and_says_so():
    whole, cut = pieces_for("count me", None)
    assert not cut and "".join(whole) == "".join(reply_words("count me"))
    first, cut = pieces_for("count me", 3)
    assert cut and first == whole[:3]
    # A forced length repeats the reply (streams of a given size), and custom words.
    long, cut = pieces_for("x", None, length=len(whole) * 2 + 1)
    assert len(long) == len(whole) * 2 + 1 and not cut
    assert "".join(pieces_for("", None, length=3, words=("a", "b"))[0]) == "a b a "
