"""The tokenizer follows the published id layout and round-trips text."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from model_impl.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(path)
    return path


def test_layout_of_specials_characters_and_vocab(tokenizer):
    assert len(tokenizer) == 65536
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [
        57344, 57345, 57346, 57347,
    ]
    for ch in ["a", " ", "\n", "é", "日", "\ud7ff", "\uf900", "\ufffe"]:
        assert tokenizer.convert_tokens_to_ids(ch) == ord(ch)
    multi = [tok for tok, i in tokenizer.get_vocab().items() if len(tok) in (2, 3) and not tok.startswith("<")]
    assert multi and all(0xD800 <= tokenizer.convert_tokens_to_ids(t) <= 0xF8FF for t in multi)
    assert sorted(tokenizer.get_vocab().values()) == list(range(65536))


def test_no_bos_is_added_and_multi_character_tokens_are_used(tokenizer):
    ids = tokenizer.encode("the test")
    assert ids[0] != tokenizer.bos_token_id and len(ids) < len("the test")
    assert tokenizer.decode(ids) == "the test"


def test_characters_above_the_bmp_are_spelled_in_utf8_bytes_and_come_back(tokenizer):
    text = "a😀b"
    ids = tokenizer.encode(text)
    assert ids == [97, *(0xE000 + b for b in "😀".encode()), 98]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in tokenizer.encode("\U0010ffff \ue000 \U0001f600")


def test_saved_tokenizer_loads_offline_with_auto_tokenizer(tokenizer, saved):
    loaded = AutoTokenizer.from_pretrained(saved)
    text = "Question: What is the capital of UK?\nAnswer: 🇬🇧 Лондон"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.decode(loaded.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200))
def test_any_text_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
