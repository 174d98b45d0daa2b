"""A tokenizer with the id layout of the author's tokenizer family (bvv241), built with `tokenizers`.

Layout (vocab 65,536, ids are 16-bit, so every id has a code):
    0x0000-0xD7FF, 0xF900-0xFFFE  the character with that code point
    0xD800-0xDFFF, 0xE100-0xF8FF  multi-character tokens (2-3 characters), then <unused_N>
    0xE000-0xE003                 <pad>, <s>, </s>, <unk>
    0xE004-0xE07F                 <unused_N>
    0xE080-0xE0FF                 byte-fallback tokens <0x80>-<0xFF>
    0xFFFF                        <unused_N>
BPE model, no normalizer, no pre-tokenizer, no post-processor: nothing is added to the
text, in particular no BOS. Characters with no id of their own (above U+FFFF, such as
most emoji, and private-use U+E000-U+F8FF) are spelled as their UTF-8 bytes with the
byte-fallback tokens (an emoji is 4 tokens) and decode back to the same character.

The author's multi-character vocabulary is not published; `DEMO_MULTI_CHAR` is a small
stand-in for test checkpoints. A real checkpoint ships its own tokenizer.json.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 65536
SPECIALS = {"<pad>": 0xE000, "<s>": 0xE001, "</s>": 0xE002, "<unk>": 0xE003}
BYTE_FALLBACK_BASE = 0xE000  # <0xNN> has id 0xE000 + NN, for NN in 0x80..0xFF
MULTI_CHAR_IDS = [*range(0xD800, 0xE000), *range(0xE100, 0xF900)]
CHARACTER_IDS = [*range(0x0000, 0xD800), *range(0xF900, 0xFFFF)]

# Frequent English character pairs and triples (spaces included: there is no pre-tokenizer).
DEMO_MULTI_CHAR = (
    "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve co me de hi "
    "ri ro ic ne ea ra ce li ch ll be ma si om ur"
).split() + [
    " t", " a", " o", " s", " i", " w", " c", " b", " p", " f", " m", "e ", "s ", "d ", "t ", "n ", "y ", ", ",
    ". ", "the", "ing", "and", "ion", "ent", "her", "tha", "for", "ell", "est", " th", "he ", "ed ", "at ",
    "is ", " of", "of ", " an", "nd ", " in", "on ", "er ", "re ",
]


def build_tokenizer(multi_char: Sequence[str] = DEMO_MULTI_CHAR) -> PreTrainedTokenizerFast:
    """The full 65,536-id tokenizer; `multi_char` fills the multi-character slots in order."""
    vocab: dict[str, int] = {chr(i): i for i in CHARACTER_IDS}
    merges: list[tuple[str, str]] = []
    free_slots = iter(MULTI_CHAR_IDS)
    for token in _with_prefixes(multi_char):
        vocab[token] = next(free_slots)
        merges.append((token[:-1], token[-1]))
    for name, token_id in SPECIALS.items():
        vocab[name] = token_id
    for byte in range(0x80, 0x100):
        vocab[f"<0x{byte:02X}>"] = BYTE_FALLBACK_BASE + byte
    used = set(vocab.values())
    for n, token_id in enumerate(i for i in range(VOCAB_SIZE) if i not in used):
        vocab[f"<unused_{n}>"] = token_id

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def _with_prefixes(tokens: Sequence[str]) -> list[str]:
    """Tokens in merge order, each preceded by the prefix it is merged from; duplicates dropped."""
    ordered: dict[str, None] = {}
    for token in sorted(tokens, key=len):
        if not 2 <= len(token) <= 3 or any(ord(ch) not in _CHARACTERS for ch in token):
            raise ValueError(f"multi-character tokens need 2-3 characters with ids of their own, got {token!r}")
        if len(token) == 3:
            ordered.setdefault(token[:2])
        ordered.setdefault(token)
    if len(ordered) > len(MULTI_CHAR_IDS):
        raise ValueError(f"{len(ordered)} multi-character tokens do not fit in {len(MULTI_CHAR_IDS)} slots")
    return list(ordered)


_CHARACTERS = frozenset(CHARACTER_IDS)
