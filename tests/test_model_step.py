"""RNNLM.step, the one-token path of sampling, against the full forward pass."""

from __future__ import annotations

import pytest
import torch

from charlm.config import ModelConfig
from charlm.model import build_model


@pytest.mark.parametrize("impl", ["torch", "custom"])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_step_by_step_logits_equal_the_forward_pass_and_leave_onednn_as_it_was(cell, impl):
    torch.manual_seed(0)
    model = build_model(ModelConfig(cell=cell, impl=impl, layers=2, embedding_size=8, hidden_size=16), 11).eval()
    tokens = torch.randint(0, 11, (3, 6))
    before = torch.backends.mkldnn.enabled
    with torch.no_grad():
        full, _ = model(tokens)
        state, steps = None, []
        for t in range(tokens.shape[1]):
            logits, state = model.step(tokens[:, t], state)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert torch.backends.mkldnn.enabled == before


def test_a_one_token_step_leaves_the_custom_layers_on_their_fast_path():
    """Catches: _step_functions not putting rnn.fast back after the step (or after a step that raised), so every
    later forward pass (scoring after sampling, training after a sample) ran the slow step functions."""
    model = build_model(ModelConfig(cell="lstm", impl="custom", embedding_size=4, hidden_size=5), 7).eval()
    assert model.rnn.fast
    with torch.no_grad():
        model.step(torch.tensor([1, 2]))
        assert model.rnn.fast
        wrong_batch = (torch.zeros(1, 3, 5), torch.zeros(1, 3, 5))
        with pytest.raises(RuntimeError):
            model.step(torch.tensor([1, 2]), wrong_batch)
    assert model.rnn.fast
