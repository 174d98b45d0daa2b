"""/v1/completions over vLLM's AsyncLLM: request -> plan -> engine requests -> OpenAI responses.

`plan` does every check before anything starts, so a bad request is a 400 and never a
stream that fails after its 200. Each prompt is one engine request with `n` (or
`best_of`) samples; outputs come back as deltas, which streaming forwards and the plain
response accumulates, so both share one path. vLLM's detokenizer holds back incomplete
UTF-8 characters and text that may still become a stop string, so deltas are safe to
forward as they are.
"""

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from vllm import SamplingParams
from vllm.inputs import tokens_input
from vllm.renderers import TokenizeParams
from vllm.sampling_params import BeamSearchParams, RequestOutputKind

from .beam_search import BeamSearch
from .errors import APIError, engine_errors, shutting_down
from .logprobs import TextCursor, TokenNames, logprobs_part, prompt_logprobs_json
from .metrics import Metrics, RequestTimer
from .protocol import CompletionRequest

TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,10}", re.ASCII)  # logit_bias keys: decimal token ids


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what echo returns: the text as sent, or the ids decoded


@dataclass
class Plan:
    """A checked completion request: its prompts and one engine parameter set per prompt."""

    req: CompletionRequest
    prompts: list[Prompt]
    params: list[SamplingParams | BeamSearchParams]
    samples: int  # engine samples per prompt: best_of, or n

    @property
    def sequences(self) -> int:
        return len(self.prompts) * self.samples

    @property
    def echo_only(self) -> bool:  # echo with max_tokens 0: score the prompt, generate nothing
        return self.req.echo and self.req.max_tokens == 0


@dataclass
class Delta:
    """What one candidate gains from one engine output (or from echoing its prompt)."""

    index: int  # candidate: prompt index * samples + sample index
    text: str = ""
    logprobs: dict | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None
    prompt: "Prompt | None" = None  # on a candidate's first delta
    prompt_logprobs: list | None = None  # vLLM's field, on the first delta
    cached_tokens: int = 0  # prompt tokens found in the prefix cache, on a prompt's first delta


class Completions:
    def __init__(self, engine, model_name: str, max_model_len: int, max_sequences: int, metrics: Metrics,
                 default_params: dict | None = None) -> None:
        self.engine, self.model_name, self.max_model_len = engine, model_name, max_model_len
        self.max_sequences, self.metrics = max_sequences, metrics
        self.default_params = default_params or {}  # the checkpoint's generation_config.json
        self.tokenizer = engine.get_tokenizer()
        self.beam_search = BeamSearch(engine)
        self.names = TokenNames(self.tokenizer)
        self.running: set[str] = set()  # engine request ids, for aborting them all at shutdown

    # ---- request -> plan ----------------------------------------------------------------------
    async def plan(self, req: CompletionRequest) -> Plan:
        self.check_combinations(req)
        prompts = await self.prompts(req)
        samples = req.best_of or req.n
        if len(prompts) * samples > self.max_sequences:
            param = "best_of" if req.best_of else "n" if samples > 1 else "prompt"
            raise APIError(400, f"{len(prompts)} prompt(s) x {samples} samples = {len(prompts) * samples} sequences; "
                           f"a request may start at most {self.max_sequences}", param, "too_many_sequences")
        params = [self.sampling_params(req, len(p.ids), samples) for p in prompts]
        return Plan(req, prompts, params, samples)

    @staticmethod
    def check_combinations(req: CompletionRequest) -> None:
        """What the schema cannot say: fields that exclude each other."""
        if req.suffix is not None:
            raise APIError(400, "suffix is not supported: this model has no fill-in-the-middle", "suffix")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo=true, to score the prompt)",
                           "max_tokens")
        if req.best_of is not None and req.best_of < req.n:
            raise APIError(400, f"best_of ({req.best_of}) must be at least n ({req.n})", "best_of")
        for name, used in (("best_of", (req.best_of or 1) > 1), ("use_beam_search", req.use_beam_search),
                           ("prompt_logprobs", req.prompt_logprobs is not None)):
            if used and req.stream:
                raise APIError(400, f"{name} cannot be used with stream=true", name)
        if req.use_beam_search and ((req.best_of or 1) > 1 or (req.echo and req.logprobs is not None)):
            param = "best_of" if (req.best_of or 1) > 1 else "echo"
            raise APIError(400, "beam search supports neither best_of nor echo with logprobs", param)

    async def prompts(self, req: CompletionRequest) -> list[Prompt]:
        """Tokenized prompts, via vLLM's renderer: length checks and truncation as vLLM's server does them,
        tokenization in the renderer's worker thread (a multi-megabyte prompt does not stall the loop)."""
        prompt = req.prompt
        if isinstance(prompt, str):
            inputs = [{"prompt": prompt}]
        elif isinstance(prompt[0], str):
            inputs = [{"prompt": p} for p in prompt]
        else:
            inputs = [{"prompt_token_ids": list(ids)} for ids in ([prompt] if isinstance(prompt[0], int) else prompt)]
        renderer = self.engine.renderer
        with engine_errors():  # vLLM's length, truncation and vocabulary checks
            for item in inputs:
                if "prompt_token_ids" in item:
                    renderer.validate_token_ids(item["prompt_token_ids"], parameter="prompt")
            params = TokenizeParams(
                max_total_tokens=self.max_model_len, max_output_tokens=req.max_tokens,
                truncate_prompt_tokens=req.truncate_prompt_tokens, truncation_side=req.truncation_side,
                add_special_tokens=req.add_special_tokens, needs_detokenization=req.echo,
                max_total_tokens_param="max_model_len", max_output_tokens_param="max_tokens",
            )
            tokenized = await renderer.tokenize_prompts_async(inputs, params)
        prompts = [Prompt(list(t["prompt_token_ids"]), t.get("prompt") or "") for t in tokenized]
        for p in prompts:
            if not p.ids:
                raise APIError(400, "prompt must not be empty", "prompt")
            if len(p.ids) >= self.max_model_len and not (req.echo and req.max_tokens == 0):
                raise APIError(400, f"prompt has {len(p.ids)} tokens, which fills the model's context of "
                               f"{self.max_model_len} tokens and leaves no room to generate", "prompt",
                               "context_length_exceeded")
        return prompts

    def sampling_params(self, req: CompletionRequest, prompt_len: int, samples: int):
        # As vLLM's server: a generation that does not fit the context is shortened to it.
        max_tokens = max(1, min(req.max_tokens, self.max_model_len - prompt_len))
        if req.use_beam_search:
            return BeamSearchParams(beam_width=req.n, max_tokens=max_tokens, ignore_eos=req.ignore_eos,
                                    temperature=self.value(req, "temperature"), length_penalty=req.length_penalty,
                                    include_stop_str_in_output=req.include_stop_str_in_output,
                                    skip_special_tokens=req.skip_special_tokens)
        logprobs = req.logprobs if req.logprobs is not None or samples == req.n else 0  # best_of ranks by them
        with engine_errors():  # vLLM's own checks of values and combinations
            params = SamplingParams(
                n=samples, max_tokens=max_tokens, min_tokens=req.min_tokens,
                temperature=self.value(req, "temperature"), top_p=self.value(req, "top_p"),
                top_k=max(self.value(req, "top_k"), 0), min_p=self.value(req, "min_p"),
                presence_penalty=self.value(req, "presence_penalty"),
                frequency_penalty=self.value(req, "frequency_penalty"),
                repetition_penalty=self.value(req, "repetition_penalty"),
                seed=req.seed, stop=req.stop_list or None, stop_token_ids=req.stop_token_ids,
                logit_bias=self.logit_bias(req.logit_bias), logprobs=logprobs, ignore_eos=req.ignore_eos,
                prompt_logprobs=req.prompt_logprobs if req.prompt_logprobs is not None
                else req.logprobs if req.echo else None,
                include_stop_str_in_output=req.include_stop_str_in_output,
                skip_special_tokens=req.skip_special_tokens,
                spaces_between_special_tokens=req.spaces_between_special_tokens,
                output_kind=RequestOutputKind.DELTA,
            )
            config = self.engine.vllm_config
            params.verify(config.model_config, config.speculative_config, config.structured_outputs_config,
                          self.tokenizer)  # what the engine would otherwise reject after the stream started
        return params

    def value(self, req: CompletionRequest, name: str):
        """A sampling field: the request's own value, else the checkpoint's default, else OpenAI's."""
        if name in req.model_fields_set:
            return getattr(req, name)
        return self.default_params.get(name, getattr(req, name))

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        if not bias:
            return None
        vocab = self.engine.model_config.get_vocab_size()
        bad = [key for key in bias if not TOKEN_ID_KEY.fullmatch(key) or not 0 <= int(key) < vocab]
        if bad:
            raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab}) written as decimal strings; "
                           f"got {bad[:5]!r}", "logit_bias", "invalid_value")
        return {int(key): float(value) for key, value in bias.items()}

    # ---- engine ---------------------------------------------------------------------------------
    async def run(self, prompt: Prompt, params, request_id: str):
        """Engine outputs (deltas) of one prompt, with metrics; cancelling it aborts the request."""
        timer = RequestTimer(self.metrics, len(prompt.ids))
        self.running.add(request_id)
        if isinstance(params, BeamSearchParams):
            outputs = self.beam_search(tokens_input(prompt.ids, prompt=prompt.text), request_id, params)
        else:
            outputs = self.engine.generate({"prompt_token_ids": prompt.ids}, params, request_id)
        try:
            async for out in outputs:
                timer.tokens(sum(len(c.token_ids) for c in out.outputs))
                yield out
        except Exception:
            # A request that failed after the engine registered it must not stay registered.
            await self.engine.abort(request_id)
            raise
        finally:
            self.running.discard(request_id)
            timer.done()

    async def abort_all(self) -> None:
        if self.running:
            await self.engine.abort(list(self.running))

    async def merged(self, plan: Plan, base_id: str):
        """(prompt index, output) from all prompts as they come; tasks die with the consumer."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for out in self.run(plan.prompts[i], plan.params[i], f"{base_id}-{i}"):
                    await queue.put((i, out))
            except Exception as err:  # surfaced to the consumer
                await queue.put((i, err))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(plan.prompts))]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    with engine_errors():
                        raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- outputs -> deltas ----------------------------------------------------------------------
    async def deltas(self, plan: Plan, request_id: str) -> AsyncIterator[Delta]:
        """What each candidate gains as outputs arrive: the echoed prompt first, then generated deltas."""
        req = plan.req
        top, as_ids = req.logprobs or 0, req.return_tokens_as_token_ids
        cursors: dict[int, TextCursor] = {}  # per candidate: where its next token starts in its text
        async for i, out in self.merged(plan, request_id):
            for sample in out.outputs:
                index = i * plan.samples + sample.index
                if sample.finish_reason == "abort":
                    raise shutting_down()  # only the shutdown aborts requests whose client is still there
                first = index not in cursors
                if first:
                    prompt = plan.prompts[i]
                    cursors[index] = TextCursor(self.tokenizer, req.skip_special_tokens)
                    echo = Delta(index, prompt=prompt, prompt_logprobs=out.prompt_logprobs,
                                 cached_tokens=(out.num_cached_tokens or 0) if sample.index == 0 else 0)
                    if req.echo:
                        echo.text = prompt.text
                        if req.logprobs is not None:
                            entries = out.prompt_logprobs or [None] * len(prompt.ids)
                            echo.logprobs = logprobs_part(prompt.ids, entries, top, self.names, as_ids,
                                                          TextCursor(self.tokenizer, req.skip_special_tokens))
                        cursors[index].offset = len(prompt.text)
                    yield echo
                delta = Delta(index, finish_reason=sample.finish_reason, stop_reason=sample.stop_reason,
                              cumulative_logprob=sample.cumulative_logprob)
                if not plan.echo_only:
                    delta.text, delta.token_ids = sample.text, list(sample.token_ids)
                    if req.logprobs is not None:
                        delta.logprobs = logprobs_part(sample.token_ids, sample.logprobs, top, self.names, as_ids,
                                                       cursors[index])
                yield delta

    def header(self, request_id: str, created: int) -> dict:
        return {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
        return usage

    # ---- responses ------------------------------------------------------------------------------
    async def complete(self, plan: Plan) -> dict:
        req = plan.req
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        candidates = [Candidate(req) for _ in range(plan.sequences)]
        async for delta in self.deltas(plan, request_id):
            candidates[delta.index].add(delta)
        choices = []
        for i in range(len(plan.prompts)):
            group = candidates[i * plan.samples:(i + 1) * plan.samples]
            if req.best_of:  # the n best by cumulative logprob, as the OpenAI API defines best_of
                group = sorted(group, key=lambda c: c.cumulative_logprob, reverse=True)[:req.n]
            choices += [c.choice(len(choices) + k) for k, c in enumerate(group)]
        generated = sum(len(c.token_ids) for c in candidates)
        cached = sum(c.cached_tokens for c in candidates)
        return {**self.header(request_id, created), "choices": choices,
                "usage": self.usage(sum(len(p.ids) for p in plan.prompts), generated, cached)}

    async def stream(self, plan: Plan) -> AsyncIterator[dict]:
        """Chunks (dicts) of a streamed completion; the caller adds SSE framing and [DONE]."""
        req = plan.req
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        header = self.header(request_id, created)
        options = req.stream_options
        generated, cached = [0] * plan.sequences, 0
        async for delta in self.deltas(plan, request_id):
            generated[delta.index] += len(delta.token_ids)
            cached += delta.cached_tokens
            if not (delta.text or delta.token_ids or delta.finish_reason or delta.logprobs and delta.logprobs["tokens"]
                    or req.return_token_ids and delta.prompt):
                continue  # as vLLM: a chunk for every new token (its text may be held back), none before
            choice = {"index": delta.index, "text": delta.text, "logprobs": delta.logprobs,
                      "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}
            if req.return_token_ids:
                choice["token_ids"] = delta.token_ids
                choice["prompt_token_ids"] = delta.prompt.ids if delta.prompt else None
            chunk = {**header, "choices": [choice]}
            if options and options.include_usage and options.continuous_usage_stats:
                prompt_tokens = len(plan.prompts[delta.index // plan.samples].ids)
                chunk["usage"] = self.usage(prompt_tokens, generated[delta.index])
            yield chunk
        if options and options.include_usage:
            prompt_tokens = sum(len(p.ids) for p in plan.prompts)
            yield {**header, "choices": [], "usage": self.usage(prompt_tokens, sum(generated), cached)}


class Candidate:
    """One sample of one prompt, accumulated for a non-streamed response."""

    def __init__(self, req: CompletionRequest) -> None:
        self.req = req
        self.text, self.token_ids, self.prompt_ids = "", [], None
        self.logprobs = {key: [] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        self.finish_reason = self.stop_reason = self.prompt_logprobs = None
        self.cumulative_logprob, self.cached_tokens = float("-inf"), 0

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        for key, values in (delta.logprobs or {}).items():
            self.logprobs[key] += values
        if delta.prompt is not None:
            self.prompt_ids, self.prompt_logprobs = delta.prompt.ids, delta.prompt_logprobs
            self.cached_tokens = delta.cached_tokens
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.stop_reason = delta.stop_reason if delta.stop_reason is not None else self.stop_reason
        if delta.cumulative_logprob is not None:
            self.cumulative_logprob = delta.cumulative_logprob

    def choice(self, index: int) -> dict:
        req = self.req
        choice = {"index": index, "text": self.text, "logprobs": self.logprobs if req.logprobs is not None else None,
                  "finish_reason": self.finish_reason, "stop_reason": self.stop_reason}
        if req.return_token_ids:
            choice["token_ids"], choice["prompt_token_ids"] = self.token_ids, self.prompt_ids
        if self.prompt_logprobs is not None:  # asked for, or computed for echo (vLLM returns them then too)
            choice["prompt_logprobs"] = prompt_logprobs_json(self.prompt_logprobs)
        return choice
