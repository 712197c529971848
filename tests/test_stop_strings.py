"""Streamed text: stop strings and UTF-8 character boundaries, in the runtime and over HTTP.

Invariants checked here:
- The released text ends right before the first stop string and never contains it, also when
  the stop string spans several tokens or stream chunks.
- Text that may be the start of a stop string is held back, and released once it cannot be.
- The cut does not depend on how the text is split into chunks.
- Generation ends with the token that completes the stop string (finish_reason "stop").
- IncrementalDetokenizer never releases a broken character. No delta contains U+FFFD unless the
  decode of all tokens has one at that place, and the deltas concatenate to that decode.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemoe.runtime.detokenizer import REPLACEMENT, IncrementalDetokenizer
from edgemoe.runtime.stop import StopStringMatcher

pytest.register_assert_rewrite("server_helpers")
from server_helpers import STORY_PROMPT, sse_events, sse_json  # noqa: E402

pytest_plugins = ["server_helpers"]

# Emoji (4-byte, some with modifiers and joiners) and Cyrillic (2-byte): a byte-level tokenizer
# splits these characters over several tokens.
MULTIBYTE_TEXT = ("Привет, мир! 😀🎉 Ёжик в тумане 👍🏽 — это тест. Съешь же ещё этих мягких "
                  "французских булок 🚀✨👩‍👩‍👧 да выпей чаю. Ωμέγα ✓ 中文 🇺🇦")


def _run_matcher(chunks: list[str], stop: list[str]) -> tuple[str, bool]:
    matcher = StopStringMatcher(stop)
    released = "".join(matcher.feed(chunk) for chunk in chunks)
    released += matcher.flush()
    return released, matcher.stopped


def _reference_cut(text: str, stop: list[str]) -> str:
    """Text up to the first character at which a stop string completes, before the longest one."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stop if s and text[:end].endswith(s)]
        if ending:
            return text[:end - max(len(s) for s in ending)]
    return text


# ---------------------------------------------------------------- StopStringMatcher


def test_matcher_cuts_within_chunk():
    assert _run_matcher(["Hello world, bye"], ["world"]) == ("Hello ", True)


def test_matcher_cuts_across_chunks():
    matcher = StopStringMatcher(["o wor"])

    assert matcher.feed("Hel") == "Hel"
    assert matcher.feed("lo wo") == "l"  # "o wo" may start the stop string
    assert matcher.feed("rld") == ""
    assert matcher.stopped


def test_matcher_releases_diverging_prefix():
    matcher = StopStringMatcher(["abc"])

    assert matcher.feed("xab") == "x"
    assert matcher.feed("d") == "abd"
    assert not matcher.stopped


def test_matcher_holds_repeated_prefix():
    assert _run_matcher(["a", "a", "a", "b", "c"], ["aab"]) == ("a", True)


def test_matcher_earliest_stop_wins():
    assert _run_matcher(["hello world"], ["world", "lo"]) == ("hel", True)


def test_matcher_substring_stop_chunking():
    by_character = _run_matcher(list("xabcd"), ["abcd", "bc"])
    whole = _run_matcher(["xabcd"], ["abcd", "bc"])

    assert by_character == ("xa", True)
    assert whole == by_character


def test_matcher_flush_releases_held_text():
    matcher = StopStringMatcher(["abc"])

    assert matcher.feed("xab") == "x"
    assert matcher.flush() == "ab"


def test_matcher_ignores_text_after_stop():
    matcher = StopStringMatcher(["stop"])
    matcher.feed("a stop b")

    assert matcher.feed("more") == ""
    assert matcher.flush() == ""


def test_matcher_without_stops_passes_through():
    assert _run_matcher(["ab", "c"], []) == ("abc", False)


def test_matcher_ignores_empty_stop():
    assert _run_matcher(["ab", "c"], [""]) == ("abc", False)


@settings(max_examples=300, deadline=None, database=None)
@given(text=st.text(alphabet="abc", max_size=30),
       stop=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=4),
       cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=10))
def test_matcher_any_chunking_matches_reference(text, stop, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    expected = _reference_cut(text, stop)

    released, stopped = _run_matcher(chunks, stop)

    assert released == expected
    assert stopped == any(s in text for s in stop)


# ---------------------------------------------------------------- UTF-8 through detokenizer and matcher


def _stream_ids(tokenizer, ids: list[int], stop: list[str]) -> tuple[list[str], bool]:
    """Deltas of feeding `ids` one by one through IncrementalDetokenizer and StopStringMatcher,
    as the generation loop does."""
    detokenizer = IncrementalDetokenizer(tokenizer.tokenizer)
    matcher = StopStringMatcher(stop)
    deltas = []
    for token_id in ids:
        deltas.append(matcher.feed(detokenizer.add(token_id)))
        if matcher.stopped:
            return deltas, True
    deltas.append(matcher.feed(detokenizer.flush()))
    deltas.append(matcher.flush())
    return deltas, matcher.stopped


def test_multibyte_text_splits_characters(demo_tokenizer):
    ids = demo_tokenizer.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    broken = [i for i in ids if REPLACEMENT in demo_tokenizer.decode([i])]

    # Precondition for the tests below: some tokens carry only part of a character.
    assert len(broken) > 10
    assert demo_tokenizer.decode(ids) == MULTIBYTE_TEXT


def test_detokenizer_never_breaks_characters(demo_tokenizer):
    ids = demo_tokenizer.encode(MULTIBYTE_TEXT, add_special_tokens=False)

    deltas, stopped = _stream_ids(demo_tokenizer, ids, ["\n\nКОНЕЦ"])

    assert not stopped
    assert [d for d in deltas if REPLACEMENT in d] == []
    assert "".join(deltas) == MULTIBYTE_TEXT


@pytest.mark.parametrize("stop", ["Ёжик", "🚀✨", "ещё этих", "🏽 —", "🇺🇦"])
def test_multibyte_stop_cuts_exactly(demo_tokenizer, stop):
    ids = demo_tokenizer.encode(MULTIBYTE_TEXT, add_special_tokens=False)

    deltas, stopped = _stream_ids(demo_tokenizer, ids, [stop])

    assert stopped
    assert "".join(deltas) == MULTIBYTE_TEXT[:MULTIBYTE_TEXT.index(stop)]
    assert [d for d in deltas if REPLACEMENT in d] == []


# ---------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def http(served_demo):
    with served_demo.client() as http_client:
        yield http_client


@pytest.fixture(scope="module")
def greedy_chunks(http) -> list[str]:
    """Text chunks of a greedy 48-token completion without stop strings, one per token."""
    body = {"prompt": STORY_PROMPT, "max_tokens": 48, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        events = sse_json(sse_events(response))
    chunks = [e["choices"][0]["text"] for e in events if e["choices"][0]["text"]]
    assert len(chunks) == 48  # precondition: ASCII text, so every token releases text at once
    return chunks


def _completion(http, **fields) -> dict:
    response = http.post("/v1/completions", json={"prompt": STORY_PROMPT, "max_tokens": 48, "temperature": 0,
                                                  **fields})
    assert response.status_code == 200, response.text
    return response.json()


def _streamed_completion(http, **fields) -> tuple[list[str], str]:
    body = {"prompt": STORY_PROMPT, "max_tokens": 48, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **fields}
    with http.stream("POST", "/v1/completions", json=body) as response:
        events = sse_json(sse_events(response))
    texts = [e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["text"]]
    finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finish) == 1
    return texts, finish[0]


def _multi_token_stop(chunks: list[str]) -> tuple[str, int]:
    """Three whole chunks from the middle of the text, and the number of tokens up to them."""
    full = "".join(chunks)
    for first in range(10, len(chunks) - 3):
        stop = "".join(chunks[first:first + 3])
        if full.find(stop) == len("".join(chunks[:first])):
            return stop, first + 3
    raise AssertionError(f"no three-chunk stop string occurs once in {full!r}")


def _spanning_stop(chunks: list[str]) -> tuple[str, str, int]:
    """A stop string from inside one chunk to inside the next, the text before it, and the
    number of tokens up to the chunk that completes it."""
    full = "".join(chunks)
    for first in range(10, len(chunks) - 1):
        left, right = chunks[first], chunks[first + 1]
        if len(left) < 3 or len(right) < 2:
            continue
        stop = left[1:] + right[:1]
        start = len("".join(chunks[:first])) + 1
        if full.find(stop) == start:
            return stop, full[:start], first + 2
    raise AssertionError(f"no chunk-spanning stop string occurs once in {full!r}")


def test_stop_cuts_whole_completion(http, greedy_chunks):
    stop, tokens = _multi_token_stop(greedy_chunks)
    full = "".join(greedy_chunks)

    body = _completion(http, stop=stop)

    text = body["choices"][0]["text"]
    assert text == full[:full.index(stop)]
    assert stop not in text
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == tokens


def test_stop_cuts_streamed_completion(http, greedy_chunks):
    stop, _ = _multi_token_stop(greedy_chunks)
    full = "".join(greedy_chunks)

    texts, finish_reason = _streamed_completion(http, stop=[stop])

    assert "".join(texts) == full[:full.index(stop)]
    assert finish_reason == "stop"


def test_stop_spanning_chunks_streamed(http, greedy_chunks):
    stop, expected, tokens = _spanning_stop(greedy_chunks)

    texts, finish_reason = _streamed_completion(http, stop=stop)
    whole = _completion(http, stop=stop)

    assert "".join(texts) == expected
    assert stop not in "".join(texts)
    assert finish_reason == "stop"
    assert whole["choices"][0]["text"] == expected
    assert whole["usage"]["completion_tokens"] == tokens


def test_stop_spanning_chunks_chat(http):
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    whole = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 48,
                                                    "temperature": 0}).json()
    full = whole["choices"][0]["message"]["content"]
    stop = full[len(full) // 2:len(full) // 2 + 7]
    expected = full[:full.index(stop)]

    body = {"messages": messages, "max_tokens": 48, "temperature": 0, "stop": [stop], "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = sse_json(sse_events(response))
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)

    assert streamed == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_stop_with_openai_client(served_demo, greedy_chunks):
    stop, expected, _ = _spanning_stop(greedy_chunks)

    with served_demo.openai() as client:
        whole = client.completions.create(model="any", prompt=STORY_PROMPT, max_tokens=48, temperature=0,
                                          stop=[stop])
        chunks = list(client.completions.create(model="any", prompt=STORY_PROMPT, max_tokens=48, temperature=0,
                                                stop=[stop], stream=True))

    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_absent_stop_changes_nothing(http, greedy_chunks):
    body = _completion(http, stop=["zebra unicorn", "\n\n\n\n"])

    assert body["choices"][0]["text"] == "".join(greedy_chunks)
    assert body["choices"][0]["finish_reason"] == "length"


def test_stop_at_start_gives_empty_text(http, greedy_chunks):
    body = _completion(http, stop=greedy_chunks[0])

    assert body["choices"][0]["text"] == ""
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 1


# Temperature 2 without top-k/top-p makes the demo model emit byte tokens. With the prompt
# "Once upon a time", seed 0 yields bytes that form no character (U+FFFD in the full decode)
# and seed 54 a character split over several tokens (checked with the demo model).
HOT_SEEDS = [0, 54]


@pytest.fixture(scope="module")
def hot_streams(http, demo_tokenizer) -> list[tuple[list[str], dict]]:
    """(chunk texts, final body) of sampled /generate streams with byte-token output."""
    streams = []
    for seed in HOT_SEEDS:
        body = {"prompt": STORY_PROMPT, "max_tokens": 200, "temperature": 2.0, "top_k": 0, "top_p": 1.0,
                "seed": seed, "stream": True}
        with http.stream("POST", "/generate", json=body) as response:
            events = sse_json(sse_events(response))
        streams.append(([e["text"] for e in events[:-1]], events[-1]))
    return streams


def test_hot_sampling_splits_characters(hot_streams, demo_tokenizer):
    broken = [t for _, final in hot_streams for t in final["token_ids"]
              if REPLACEMENT in demo_tokenizer.decode([t])]

    # Precondition: the sample contains tokens that are only part of a character.
    assert broken


@pytest.mark.parametrize("index", range(len(HOT_SEEDS)), ids=[f"seed{s}" for s in HOT_SEEDS])
def test_stream_chunks_decode_like_whole(hot_streams, demo_tokenizer, index):
    chunks, final = hot_streams[index]
    whole = demo_tokenizer.decode(final["token_ids"])

    assert "".join(chunks) == whole
    assert "".join(chunks) == final["text"]
    assert sum(c.count(REPLACEMENT) for c in chunks) == whole.count(REPLACEMENT)


def test_hot_completion_stream_equals_whole(http):
    body = {"prompt": STORY_PROMPT, "max_tokens": 200, "temperature": 2.0, "top_k": 0, "seed": 54}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        events = sse_json(sse_events(response))

    assert "".join(e["choices"][0]["text"] for e in events) == whole
