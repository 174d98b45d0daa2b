"""OpenAI `logprobs` objects from vLLM's per-token logprob dicts.

Byte-fallback tokens (an emoji is 4 of them) do not decode to text on their own, so a
token's *name* and its *place in the text* are kept apart: a token that is not whole
text is named by its vocabulary piece ("<0xF0>"), and `text_offset` points every byte
of a character at where that character starts in the returned text.
"""

from vllm.logprobs import Logprob
from vllm.tokenizers.detokenizer_utils import convert_ids_list_to_tokens

LOGPROB_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
LOGPROB_FLOOR = -9999.0  # what OpenAI and vLLM send for -inf (JSON has no infinities)


def clamp(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN fails the test too


class TokenNames:
    """What a token is called in `tokens` and `top_logprobs`: its own text, the same wherever it occurs.

    (vLLM's logprob entries carry text decoded in context, "" for the first bytes of a
    character, which would make byte tokens indistinguishable.)
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.names = tokenizer, {}

    def __call__(self, token_id: int, as_token_ids: bool = False) -> str:
        if as_token_ids:
            return f"token_id:{token_id}"
        name = self.names.get(token_id)
        if name is None:
            (name,) = convert_ids_list_to_tokens(self.tokenizer, [token_id])
            if "\ufffd" in name:  # part of a character: its piece keeps it distinguishable
                name = self.tokenizer.convert_ids_to_tokens(token_id)
            self.names[token_id] = name
        return name


class TextCursor:
    """Offsets of tokens in a text being built token by token.

    Tokens are decoded in groups that end on a whole character, so the bytes of a split
    character all get the character's start, and the offsets index the returned text.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool, start: int = 0) -> None:
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.offset, self.pending = start, []

    def advance(self, token_id: int) -> int:
        at = self.offset
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
        if not text.endswith("\ufffd"):
            self.offset += len(text)
            self.pending = []
        return at


def logprobs_part(token_ids, entries: list[dict[int, Logprob] | None], top: int, names: TokenNames,
                  as_token_ids: bool, cursor: TextCursor) -> dict:
    """OpenAI logprobs lists for `token_ids`; an entry of None (the first prompt token) has no logprob.

    `top_logprobs` keeps the sampled token and the `top` most likely, as OpenAI defines it.
    """
    part = {key: [] for key in LOGPROB_KEYS}
    for token, entry in zip(token_ids, entries):
        part["tokens"].append(names(token, as_token_ids))
        part["token_logprobs"].append(clamp(entry[token].logprob) if entry else None)
        part["top_logprobs"].append(
            {names(t, as_token_ids): clamp(lp.logprob) for i, (t, lp) in enumerate(entry.items()) if i <= top}
            if entry else None
        )
        part["text_offset"].append(cursor.advance(token))
    return part


def prompt_logprobs_json(entries: list[dict[int, Logprob] | None] | None) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs` field: per prompt token, {token id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [
        {str(t): {"logprob": clamp(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
         for t, lp in entry.items()} if entry else None
        for entry in entries
    ]
