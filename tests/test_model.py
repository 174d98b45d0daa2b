"""The Transformers model: no input table, cached generation equals recomputation."""

import pytest
import torch
from torch import nn

from model_impl import TableFreeForCausalLM
from model_impl.checkpoint import input_embedding_parameters, make_config, random_model


@pytest.fixture(scope="module")
def tiny_model() -> TableFreeForCausalLM:
    return random_model(make_config("tiny"), seed=3)


def recompute_greedy(model, prompt: torch.Tensor, steps: int):
    """Greedy decoding with no cache: the whole sequence is recomputed for every token."""
    seq, logits = prompt, []
    for _ in range(steps):
        last = model(seq, use_cache=False).logits[:, -1]
        logits.append(last)
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return seq, torch.stack(logits, 1)


@torch.no_grad()
def test_cached_generate_equals_recomputing_every_step(tiny_model):
    prompt = torch.tensor([[81, 117, 101, 115, 116, 105, 111, 110, 58, 32, 57811, 300, 65535]])
    out = tiny_model.generate(
        prompt, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    seq, logits = recompute_greedy(tiny_model, prompt, 24)
    assert torch.equal(out.sequences, seq)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, rtol=0, atol=1e-5)


@torch.no_grad()
def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny_model):
    pad = tiny_model.config.pad_token_id
    prompts = [[5, 6, 7, 8, 9, 10], [200, 300], [40000, 1, 2, 3]]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for row, prompt in zip(batch, prompts):
        alone = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        assert row[width:].tolist() == alone[0, len(prompt):].tolist()


def test_card_shape_has_about_470m_parameters_and_no_input_table():
    with torch.device("meta"):
        model = TableFreeForCausalLM(make_config("card"))
    total = sum(p.numel() for p in model.parameters())
    assert 465e6 < total < 475e6, total
    assert input_embedding_parameters(model) == 0
    vocab, width = model.config.vocab_size, model.config.hidden_size
    vocab_shaped = {name for name, p in model.named_parameters() if set(p.shape) == {vocab, width}}
    assert vocab_shaped == {"lm_head.weight"}  # the untied output head, and nothing on the input side
    assert not any(isinstance(m, nn.Embedding) for m in model.modules())


def test_codes_enter_the_first_layer(tiny_model):
    """Different ids give different hidden states: the inputs really are the codes of the ids."""
    with torch.no_grad():
        hidden = tiny_model.model(torch.tensor([[0, 1, 2, 65535]])).last_hidden_state[0]
    assert torch.cdist(hidden, hidden).fill_diagonal_(1.0).min() > 1e-3
