"""Greedy parity between a vLLM engine and a Transformers reference model.

Used by `tablefree verify` and by the tests. The near-tie rule follows vLLM's own
`check_logprobs_close`: where the two sides pick different tokens, each pick must be in
the other side's top-2 with a logprob gap under 1e-4; the comparison of that sequence
stops there and the case is counted. Imports no vLLM: it compares what vLLM returned.
"""

from dataclasses import dataclass, field

import torch

TIE_GAP = 1e-4
# float32 on both sides: differences beyond this are not rounding noise
LOGPROB_ATOL = 1e-3

Completion = tuple[list[int], list[dict[int, float]]]  # tokens, top logprobs per step


@dataclass
class Reference:
    tokens: list[int]
    logprobs: torch.Tensor  # (steps, vocab), log_softmax of the raw logits


@torch.no_grad()
def greedy_reference(model, prompts: list[list[int]], max_new_tokens: int) -> list[Reference]:
    """Greedy tokens and full logprobs of a Transformers causal LM, ignoring EOS (like vLLM's ignore_eos)."""
    model.generation_config.eos_token_id = None
    refs = []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        logprobs = torch.log_softmax(torch.stack(out.logits, 1)[0].float(), -1)
        refs.append(Reference(out.sequences[0, len(prompt) :].tolist(), logprobs))
    return refs


@dataclass
class ParityReport:
    sequences: int = 0
    tokens_compared: int = 0
    near_ties: int = 0
    max_logprob_diff: float = 0.0
    failures: list[str] = field(default_factory=list)


def completions(outputs) -> list[Completion]:
    """vLLM RequestOutputs -> (tokens, [{token: logprob}] per step), JSON-friendly."""
    return [
        (list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
        for o in outputs
    ]


def compare(refs: list[Reference], got_completions: list[Completion], atol: float = LOGPROB_ATOL) -> ParityReport:
    """`got_completions`: greedy vLLM outputs with `logprobs` >= 2, as `completions` gives them."""
    report = ParityReport()
    for seq, (ref, (tokens, tops)) in enumerate(zip(refs, got_completions, strict=True)):
        report.sequences += 1
        for step, (want, got) in enumerate(zip(ref.tokens, tokens, strict=True)):
            top = tops[step]  # token id -> logprob, the sampled token included
            ref_lp = ref.logprobs[step]
            if got != want:
                ref_top2 = ref_lp.topk(2).indices.tolist()
                vllm_top2 = sorted(top, key=lambda t: -top[t])[:2]
                tie = (
                    got in ref_top2
                    and want in vllm_top2
                    and abs(ref_lp[got] - ref_lp[want]) < TIE_GAP
                    and abs(top[got] - top[want]) < TIE_GAP
                )
                if not tie:
                    report.failures.append(f"sequence {seq} step {step}: vLLM {got}, Transformers {want}")
                report.near_ties += tie
                break
            report.tokens_compared += 1
            for token, lp in top.items():
                diff = abs(lp - ref_lp[token].item())
                report.max_logprob_diff = max(report.max_logprob_diff, diff)
                if diff > atol:
                    report.failures.append(f"sequence {seq} step {step} token {token}: logprob diff {diff:.2e}")
    return report
