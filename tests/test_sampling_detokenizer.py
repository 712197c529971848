"""Sampling rules and incremental detokenization.

Invariants checked:
- Temperature 0 and top_k 1 both pick the argmax, the lower index on ties.
- top_p keeps the smallest prefix of the sorted distribution whose mass reaches top_p.
- top_k keeps only the k most likely tokens.
- The same seed gives the same token sequence.
- Invalid sampling parameters raise ValueError naming the field.
- With the demo tokenizer, on text full of emoji and Cyrillic, the concatenated deltas of the
  incremental detokenizer equal `decode(all ids)`, and no delta contains U+FFFD.
- The detokenizer holds back a partial multi-byte character until it is complete.
- Special-token markup typed in a prompt is encoded as text, so "<|endoftext|>" gives id 0
  only as the BOS that the post-processor adds.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.runtime.detokenizer import REPLACEMENT, IncrementalDetokenizer
from edgemoe.runtime.manifest import load_manifest
from edgemoe.runtime.sampling import Sampler, SamplingParams
from edgemoe.runtime.tokenizer import BundleTokenizer

SEEDS = range(300)
# log of [0.5, 0.3, 0.2]: at temperature 1 the softmax gives back these probabilities.
THREE_TOKEN_LOGITS = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
MULTILINGUAL_TEXTS = {
    "cyrillic-zwj-emoji": "Привет, мир! 😀🎉 Кот 🐈‍⬛ ёжик 👩‍👩‍👧",
    "spaces-newlines-flag": " 🙂🙂  Ёлка\n\nЩука 🇺🇦 конец ",
    "english-mixed": "Once upon a time 🦊 лиса jumped over 🌈🌈🌈.",
    "cyrillic-pangram": "Съешь же ещё этих мягких французских булок, да выпей чаю 🍞☕",
    "single-emoji": "😀",
}


def sample_set(params: SamplingParams, logits: np.ndarray, seeds=SEEDS) -> set[int]:
    """Return the tokens picked by one draw for each seed."""
    tokens = set()
    for seed in seeds:
        params.seed = seed
        tokens.add(Sampler(params)(logits))
    return tokens


def test_temperature_zero_is_argmax():
    logits = np.random.default_rng(0).normal(size=100).astype(np.float32)

    assert sample_set(SamplingParams(temperature=0.0), logits, range(20)) == {int(np.argmax(logits))}


def test_top_k_one_is_argmax():
    rng = np.random.default_rng(1)
    for _ in range(20):
        logits = rng.normal(size=50).astype(np.float32)
        params = SamplingParams(temperature=1.5, top_k=1, top_p=1.0)
        assert sample_set(params, logits, range(10)) == {int(np.argmax(logits))}


def test_top_k_one_tie_lower_index():
    logits = np.array([0.0, 2.0, 2.0, 1.0], dtype=np.float32)

    assert sample_set(SamplingParams(temperature=1.0, top_k=1, top_p=1.0), logits, range(10)) == {1}


def test_top_p_smallest_prefix():
    # Masses of the sorted prefixes: 0.5, 0.8, 1.0. top_p 0.6 needs the first two tokens.
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.6)

    assert sample_set(params, THREE_TOKEN_LOGITS) == {0, 1}


def test_top_p_below_first_mass():
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.45)

    assert sample_set(params, THREE_TOKEN_LOGITS) == {0}


def test_top_p_above_two_masses():
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.85)

    assert sample_set(params, THREE_TOKEN_LOGITS) == {0, 1, 2}


def test_top_p_kept_mass_renormalized():
    # After top_p 0.6, tokens 0 and 1 have probabilities 0.5/0.8 and 0.3/0.8.
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.6, seed=123)
    sampler = Sampler(params)
    draws = np.array([sampler(THREE_TOKEN_LOGITS) for _ in range(4000)])

    assert abs(np.mean(draws == 0) - 0.625) < 0.03


def test_top_k_keeps_k_tokens():
    logits = np.array([1.0, 3.0, 0.5, 2.5, 2.0], dtype=np.float32)
    params = SamplingParams(temperature=5.0, top_k=2, top_p=1.0)

    assert sample_set(params, logits) == {1, 3}


def test_same_seed_same_sequence():
    logits = np.random.default_rng(2).normal(size=64).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=42)

    sampler_a, sampler_b = Sampler(params), Sampler(params)
    sequence_a = [sampler_a(logits) for _ in range(50)]
    sequence_b = [sampler_b(logits) for _ in range(50)]

    assert sequence_a == sequence_b
    assert len(set(sequence_a)) > 1  # the draws are random, not a constant


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("temperature", 101.0), ("temperature", float("nan")),
    ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("seed", -1), ("seed", 2**63),
])
def test_invalid_params_name_field(field, value):
    params = SamplingParams(**{field: value})

    with pytest.raises(ValueError) as error:
        Sampler(params)

    assert field in str(error.value)


@pytest.fixture(scope="module")
def demo_tokenizer(demo_bundle) -> BundleTokenizer:
    return BundleTokenizer(demo_bundle, load_manifest(demo_bundle))


@pytest.mark.parametrize("text", MULTILINGUAL_TEXTS.values(), ids=MULTILINGUAL_TEXTS.keys())
def test_detokenizer_deltas_join_to_decode(text, demo_tokenizer):
    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(demo_tokenizer.tokenizer)

    deltas = [detokenizer.add(token_id) for token_id in ids]
    tail = detokenizer.flush()

    assert "".join(deltas) + tail == demo_tokenizer.decode(ids)
    assert "".join(deltas) + tail == text
    assert [delta for delta in deltas if REPLACEMENT in delta] == []
    assert tail == ""


def test_detokenizer_holds_partial_character(demo_tokenizer):
    ids = demo_tokenizer.encode("a😀", add_special_tokens=False)
    assert len(ids) > 2, "test setup: the emoji must span several byte tokens"
    detokenizer = IncrementalDetokenizer(demo_tokenizer.tokenizer)

    deltas = [detokenizer.add(token_id) for token_id in ids]

    assert deltas[0] == "a"
    assert deltas[1:-1] == [""] * (len(ids) - 2)
    assert deltas[-1] == "😀"


def test_detokenizer_flush_partial_character(demo_tokenizer):
    ids = demo_tokenizer.encode("😀", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(demo_tokenizer.tokenizer)

    deltas = [detokenizer.add(token_id) for token_id in ids[:-1]]

    assert deltas == [""] * (len(ids) - 1)
    assert detokenizer.flush() == REPLACEMENT


def test_special_token_markup_is_text(demo_tokenizer):
    ids = demo_tokenizer.encode("<|endoftext|>")

    assert ids[0] == 0  # BOS added by the post-processor
    assert 0 not in ids[1:]
    assert len(ids) > 2
    assert demo_tokenizer.decode(ids[1:]) == "<|endoftext|>"
