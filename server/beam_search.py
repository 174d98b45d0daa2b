"""`use_beam_search`: vLLM's own online beam search, driven by this server's engine."""

from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin


class BeamSearch(BeamSearchOnlineMixin):
    """vLLM's beam search (one engine request per beam and step) needs only an engine and its renderer."""

    def __init__(self, engine) -> None:
        self.engine_client, self.renderer = engine, engine.renderer

    def __call__(self, engine_input: dict, request_id: str, params):
        return self.beam_search(engine_input, request_id, params)
