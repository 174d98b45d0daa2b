"""/v1/chat/completions, when the operator gives a chat template (`--chat-template FILE`).

The checkpoint is a base model with no template of its own, so chat exists only with the
operator's: messages are rendered with Transformers' `apply_chat_template`, the rendered
text runs as a completion (same checks, limits and engine path), and the result is
reshaped into chat objects and chunks.
"""

import re
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from jinja2 import TemplateError
from pydantic import Field, StrictBool, StrictInt

from .errors import APIError
from .protocol import INT32_MAX, APIModel, CompletionRequest, SamplingRequest, Text

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # byte-fallback tokens' vocabulary pieces
# Completion fields as chat requests call them, for error messages.
CHAT_PARAMS = {"prompt": "messages", "logprobs": "top_logprobs"}


class TextPart(APIModel):
    type: Literal["text"]
    text: Text


class Message(APIModel):
    role: Text
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str | None:
        return self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)


class ChatRequest(SamplingRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(None, description="deprecated name of "
                                                                  "max_completion_tokens")
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=INT32_MAX)] | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False

    def completion(self, prompt: str, context: int) -> CompletionRequest:
        """The completion to run; with no token limit it may fill the `context`, as in OpenAI's chat."""
        fields = {name: getattr(self, name) for name in SamplingRequest.model_fields if name in self.model_fields_set}
        fields["max_tokens"] = self.max_completion_tokens or self.max_tokens or context
        if self.logprobs:
            fields["logprobs"] = self.top_logprobs or 0
        return CompletionRequest(prompt=prompt, add_special_tokens=False, **fields)  # the template adds specials


def render(tokenizer, template: str, req: ChatRequest) -> str:
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
        )
    except (TemplateError, ValueError) as err:  # the template's own checks (roles, order) are the client's
        raise APIError(400, f"messages do not fit the chat template: {err}", "messages", "invalid_messages") from err


def chat_logprobs(logprobs: dict | None) -> dict | None:
    if logprobs is None:
        return None

    def entry(token: str, logprob: float) -> dict:
        piece = BYTE_PIECE.fullmatch(token)
        return {"token": token, "logprob": logprob,
                "bytes": [int(piece.group(1), 16)] if piece else list(token.encode())}

    return {"content": [
        {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in (top or {}).items()]}
        for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"])
    ]}


def chat_response(completion: dict) -> dict:
    choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                "logprobs": chat_logprobs(c["logprobs"]), "finish_reason": c["finish_reason"],
                "stop_reason": c["stop_reason"]} for c in completion["choices"]]
    return {"id": "chat" + completion["id"], "object": "chat.completion", "created": completion["created"],
            "model": completion["model"], "choices": choices, "usage": completion["usage"]}


async def chat_chunks(chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """Completion chunks as chat chunks: each choice's first delta carries the role."""
    started: set[int] = set()
    async for chunk in chunks:
        header = {"id": "chat" + chunk["id"], "object": "chat.completion.chunk", "created": chunk["created"],
                  "model": chunk["model"]}
        choices = []
        for c in chunk["choices"]:
            delta = {"content": c["text"]}
            if c["index"] not in started:
                started.add(c["index"])
                delta = {"role": "assistant", **delta}
            choices.append({"index": c["index"], "delta": delta, "logprobs": chat_logprobs(c["logprobs"]),
                            "finish_reason": c["finish_reason"], "stop_reason": c["stop_reason"]})
        yield {**header, "choices": choices, **({"usage": chunk["usage"]} if "usage" in chunk else {})}
