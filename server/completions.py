"""/v1/completions over vLLM's AsyncLLM: prompts -> engine requests -> OpenAI responses.

Every prompt is one engine request with `n` samples; outputs come back as deltas, which
streaming forwards and the plain response accumulates, so both share one path. vLLM's
detokenizer already holds back incomplete UTF-8 characters and text that may still become
a stop string, so deltas are safe to forward as they are.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.exceptions import EngineDeadError

from .errors import APIError
from .metrics import Metrics, RequestTimer
from .protocol import CompletionRequest


def engine_error(err: Exception) -> Exception:
    """The engine's exceptions as API errors: its request checks are 400s, a dead engine 503."""
    if isinstance(err, (VLLMClientError, ValueError)):
        return APIError(400, str(err))
    if isinstance(err, EngineDeadError):
        return APIError(503, "engine is not running", None, "engine_dead")
    return err


@dataclass
class Prompt:
    ids: list[int]
    text: str | None  # the text as sent, for echo; None for token-id prompts


@dataclass
class Delta:
    """What one choice gains from one engine output (or from echoing its prompt)."""

    index: int
    text: str
    logprobs: dict | None  # OpenAI logprobs lists for the new tokens
    finish_reason: str | None = None
    tokens: int = 0  # generated tokens in it


LOGPROB_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


class Completions:
    def __init__(self, engine, tokenizer, model_name: str, max_model_len: int, vocab_size: int, metrics: Metrics):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.max_model_len, self.vocab_size, self.metrics = max_model_len, vocab_size, metrics

    # ---- request -> engine inputs -------------------------------------------------------
    def prompts(self, prompt) -> list[Prompt]:
        if isinstance(prompt, str):
            return [Prompt(self.tokenizer.encode(prompt), prompt)]
        if isinstance(prompt[0], str):
            return [Prompt(self.tokenizer.encode(p), p) for p in prompt]
        lists = [prompt] if isinstance(prompt[0], int) else prompt
        for ids in lists:
            self.check_ids(ids, "prompt")
        return [Prompt(list(ids), None) for ids in lists]

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside [0, {self.vocab_size})", param, "invalid_token_id")

    def sampling_params(self, req: CompletionRequest, prompts: list[Prompt]) -> SamplingParams:
        longest = max(len(p.ids) for p in prompts)
        if any(not p.ids for p in prompts):
            raise APIError(400, "prompt must not be empty", "prompt")
        if longest >= self.max_model_len:
            raise APIError(400, f"prompt has {longest} tokens; the model's context is {self.max_model_len}",
                           "prompt", "context_length_exceeded")
        max_tokens = req.max_tokens if req.max_tokens is not None else self.max_model_len - longest
        if longest + max_tokens > self.max_model_len:
            raise APIError(400, f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                           f"of {self.max_model_len} tokens", "max_tokens", "context_length_exceeded")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
        self.check_ids(req.stop_token_ids or [], "stop_token_ids")
        logit_bias = {}
        for key, bias in (req.logit_bias or {}).items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < self.vocab_size:
                raise APIError(400, f"logit_bias key {key!r} is not a token id in [0, {self.vocab_size})", "logit_bias")
            logit_bias[int(key)] = float(bias)
        try:
            return SamplingParams(
                n=req.n, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                top_k=max(req.top_k, 0), min_p=req.min_p, seed=req.seed, stop=req.stop_list or None,
                stop_token_ids=req.stop_token_ids, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                logit_bias=logit_bias or None, logprobs=req.logprobs, ignore_eos=req.ignore_eos,
                prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
                include_stop_str_in_output=req.include_stop_str_in_output,
                output_kind=RequestOutputKind.DELTA,
            )
        except ValueError as err:  # vLLM's own checks of combinations
            raise APIError(400, str(err)) from err

    # ---- engine ----------------------------------------------------------------------------
    async def run(self, prompt: Prompt, params: SamplingParams, request_id: str):
        """Engine outputs (deltas) of one prompt, with metrics; cancelling it aborts the request."""
        timer = RequestTimer(self.metrics, len(prompt.ids))
        try:
            async for out in self.engine.generate({"prompt_token_ids": prompt.ids}, params, request_id):
                timer.tokens(sum(len(c.token_ids) for c in out.outputs))
                yield out
        finally:
            timer.done()

    async def merged(self, prompts: list[Prompt], params: SamplingParams, base_id: str):
        """(prompt index, output) from all prompts as they come; tasks die with the consumer."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, prompt: Prompt) -> None:
            try:
                async for out in self.run(prompt, params, f"{base_id}-{i}"):
                    await queue.put((i, out))
            except Exception as err:  # surfaced to the consumer
                await queue.put((i, err))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise engine_error(item) from item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- responses -------------------------------------------------------------------------
    def logprobs_part(self, token_ids, entries, offset: int) -> tuple[dict, int]:
        """OpenAI logprobs for tokens with vLLM logprob dicts (None: no logprob, first prompt token)."""
        part = {key: [] for key in LOGPROB_KEYS}
        for token, entry in zip(token_ids, entries):
            text = entry[token].decoded_token if entry else self.tokenizer.decode([token])
            part["tokens"].append(text)
            part["token_logprobs"].append(entry[token].logprob if entry else None)
            part["top_logprobs"].append({lp.decoded_token: lp.logprob for lp in entry.values()} if entry else None)
            part["text_offset"].append(offset)
            offset += len(text)
        return part, offset

    def echo_parts(self, prompt: Prompt, out, want_logprobs: bool) -> tuple[str, dict | None, int]:
        text = prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.ids)
        if not want_logprobs:
            return text, None, len(text)
        part, offset = self.logprobs_part(prompt.ids, out.prompt_logprobs or [None] * len(prompt.ids), 0)
        return text, part, offset

    def header(self, request_id: str, created: int) -> dict:
        return {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name}

    @staticmethod
    def usage(prompts: list[Prompt], completion_tokens: int) -> dict:
        prompt_tokens = sum(len(p.ids) for p in prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def deltas(self, req: CompletionRequest, prompts: list[Prompt], params: SamplingParams, request_id: str):
        """What each choice gains as outputs arrive: the echoed prompt first, then generated deltas."""
        offsets: dict[int, int] = {}  # per choice: text length so far, for logprobs' text_offset
        want_logprobs = req.logprobs is not None
        async for i, out in self.merged(prompts, params, request_id):
            for sample in out.outputs:
                index = i * req.n + sample.index
                if index not in offsets:
                    offsets[index] = 0
                    if req.echo:
                        text, logprobs, offsets[index] = self.echo_parts(prompts[i], out, want_logprobs)
                        yield Delta(index, text, logprobs)
                logprobs = None
                if want_logprobs:
                    logprobs, offsets[index] = self.logprobs_part(sample.token_ids, sample.logprobs, offsets[index])
                yield Delta(index, sample.text, logprobs, sample.finish_reason, len(sample.token_ids))

    async def complete(self, req: CompletionRequest, prompts: list[Prompt], params: SamplingParams) -> dict:
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        choices = {
            index: {"index": index, "text": "", "finish_reason": None,
                    "logprobs": {key: [] for key in LOGPROB_KEYS} if req.logprobs is not None else None}
            for index in range(len(prompts) * req.n)
        }
        completion_tokens = 0
        async for delta in self.deltas(req, prompts, params, request_id):
            choice = choices[delta.index]
            choice["text"] += delta.text
            for key, values in (delta.logprobs or {}).items():
                choice["logprobs"][key] += values
            choice["finish_reason"] = delta.finish_reason or choice["finish_reason"]
            completion_tokens += delta.tokens
        return {**self.header(request_id, created), "choices": list(choices.values()),
                "usage": self.usage(prompts, completion_tokens)}

    async def stream(self, req: CompletionRequest, prompts: list[Prompt], params: SamplingParams) -> AsyncIterator[dict]:
        """Chunks (dicts) of a streamed completion; the caller adds SSE framing and [DONE]."""
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        header = self.header(request_id, created)
        completion_tokens = 0
        async for delta in self.deltas(req, prompts, params, request_id):
            completion_tokens += delta.tokens
            if delta.text or delta.finish_reason or delta.logprobs and delta.logprobs["tokens"]:
                yield {**header, "choices": [{"index": delta.index, "text": delta.text, "logprobs": delta.logprobs,
                                              "finish_reason": delta.finish_reason}]}
        if req.stream_options and req.stream_options.include_usage:
            yield {**header, "choices": [], "usage": self.usage(prompts, completion_tokens)}
