"""IncrementalDetokenizer on the real SmolLM2 tokenizer: token-by-token text equals a one-shot decode,
stop strings are found across token boundaries, and streaming never hands out text a stop string will cut."""
from __future__ import annotations

import pytest

from tokenmill.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    " Hello, world! This is a plain English sentence.",
    " Emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 ❤️ ✨ done",
    " 日本語のテキストと中文文本，还有한국어 문장。",
    " Café déjà vu — naïve façade, Ångström, São Paulo, Zürich, ŒUVRE.",
    "def add(a, b):\n    return a + b\n\n\tprint(add(1, 2))  # -> 3\n",
    "   spaces   and\n\nnewlines\r\n ",
    "😀",
    "x" * 3 + "🎉" * 4,
]
TEXT_IDS = ["english", "emoji", "cjk", "accents", "code", "whitespace", "one-emoji", "emoji-run"]
PROMPT = "User: say something.\nAssistant:"


@pytest.fixture(scope="module")
def tok(llm_f32):
    return llm_f32.tokenizer


def _feed(detok: IncrementalDetokenizer, ids: list[int], finish: bool = True) -> tuple[list[str], list[str]]:
    """Add ids one by one (stopping when a stop string is hit): texts after each step and the streamed pieces."""
    texts, pieces = [], []
    for i, token in enumerate(ids):
        detok.add(token)
        texts.append(detok.text)
        done = detok.stopped_by is not None or (finish and i == len(ids) - 1)
        pieces.append(detok.stream_delta(done))
        if detok.stopped_by is not None:
            break
    return texts, pieces


@pytest.mark.parametrize("with_prompt", [False, True], ids=["no-prompt", "prompt"])
@pytest.mark.parametrize("text", TEXTS, ids=TEXT_IDS)
def test_incremental_text_equals_full_decode(tok, text, with_prompt):
    ids = tok.encode(text, add_special_tokens=False)
    prompt_ids = tok.encode(PROMPT) if with_prompt else []
    detok = IncrementalDetokenizer(tok, prompt_ids)
    texts, pieces = _feed(detok, ids)
    expected = tok.decode(ids)
    assert detok.text == expected == text
    assert "".join(pieces) == expected
    for partial in texts:  # text only ever grows, and never shows half a character
        assert expected.startswith(partial)
        assert "\ufffd" not in partial


def test_texts_really_split_characters_across_tokens(tok):
    """Guard for the test above: some emoji/CJK tokens are partial UTF-8 on their own."""
    ids = tok.encode(TEXTS[1] + TEXTS[2], add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(tok, skip):
    ids = tok.encode("Hi there<|im_end|>\n<|im_start|>user\nok", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), skip_special_tokens=skip)
    _, pieces = _feed(detok, ids)
    assert detok.text == tok.decode(ids, skip_special_tokens=skip) == "".join(pieces)
    assert ("<|im_end|>" in detok.text) is (not skip)


def _boundary_stop(tok, text: str, token_index: int, left: int, right: int) -> tuple[list[int], str]:
    """A stop string made of the last `left` chars of token `token_index` and the first `right` chars after it."""
    ids = tok.encode(text, add_special_tokens=False)
    cut = len(tok.decode(ids[: token_index + 1]))
    assert tok.decode(ids) == text and left <= len(tok.decode(ids[token_index:token_index + 1]))
    return ids, text[cut - left: cut + right]


STOP_TEXT = " The quick brown fox jumps over the lazy dog and keeps running far away."


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_two_tokens(tok, include):
    ids, stop = _boundary_stop(tok, STOP_TEXT, token_index=4, left=2, right=3)
    at = STOP_TEXT.index(stop)
    detok = IncrementalDetokenizer(tok, [1, 2, 3], stop=[stop], include_stop_str_in_output=include)
    texts, pieces = _feed(detok, ids)
    assert detok.stopped_by == stop
    assert len(texts) == 6  # found when the 6th token completes it, not earlier
    assert detok.text == (STOP_TEXT[: at + len(stop)] if include else STOP_TEXT[:at])
    assert "".join(pieces) == detok.text


def test_stop_string_spanning_several_tokens_and_earliest_stop_wins(tok):
    ids = tok.encode(STOP_TEXT, add_special_tokens=False)
    stops = ["keeps running", "own fox jumps ov", "lazy"]
    detok = IncrementalDetokenizer(tok, [], stop=stops)
    _feed(detok, ids)
    assert detok.stopped_by == "own fox jumps ov"
    assert detok.text == " The quick br"


def test_stop_string_inside_one_token(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["ump"])
    _feed(detok, tok.encode(STOP_TEXT, add_special_tokens=False))
    assert detok.stopped_by == "ump"
    assert detok.text == " The quick brown fox j"


def test_stop_string_with_multibyte_characters(tok):
    text = " Emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 flag"
    detok = IncrementalDetokenizer(tok, [], stop=["👍🏽 fa"])
    _feed(detok, tok.encode(text, add_special_tokens=False))
    assert detok.stopped_by == "👍🏽 fa"
    assert detok.text == " Emoji: 😀"


def _held_back_ok(text: str, streamed: str, stops: list[str]) -> bool:
    """Every suffix of `text` that could still grow into a stop string is not streamed yet."""
    tail = len(text) - len(streamed)
    longest = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return tail >= longest


@pytest.mark.parametrize("text,stops,final", [
    # a prefix of the stop ("the en") appears, then "-suite" resolves it: it must be released before the end
    (" We went to the en-suite room, then back to the end of the hall.", ["the end"],
     " We went to the en-suite room, then back to "),
    # several stops of different lengths; the text never contains any of them
    (" Stop signs: STO, ST0P, S T O P, and st op are all different.", ["STOP", "S.T.O.P."], None),
], ids=["prefix-resolved-then-stop", "prefixes-never-complete"])
def test_stream_delta_holds_back_possible_stop_prefix(tok, text, stops, final):
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), stop=stops)
    longest_stop = max(map(len, stops))
    streamed = ""
    released_early = False
    for i, token in enumerate(ids):
        detok.add(token)
        done = detok.stopped_by is not None or i == len(ids) - 1
        streamed += detok.stream_delta(done)
        assert detok.text.startswith(streamed)
        if done:
            break
        assert _held_back_ok(detok.text, streamed, stops), (detok.text, streamed)
        assert len(streamed) >= len(detok.text) - (longest_stop - 1)  # holds back no more than it must
        released_early |= "the en-" in streamed
    assert streamed == detok.text == (final if final is not None else text)
    if final is not None:
        assert detok.stopped_by == "the end"
        assert released_early, "resolved text must stream before the request finishes"


def test_stream_delta_without_stops_streams_everything_immediately(tok):
    ids = tok.encode(TEXTS[0], add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    for token in ids:
        detok.add(token)
        before = detok.text
        assert before.endswith(detok.stream_delta(False))
        assert detok.stream_delta(False) == ""  # nothing handed out twice
