"""Prefix tuning's start from real tokens (``init = "tokens"``): the model with the fresh prefix
gives the logits the frozen model gives with those tokens written in front of the input."""

import copy
import random

import pytest
import torch

from peftlab import ValidationError, attach, load_host
from peftlab.cell.models import ModelConfig, load

HOST = load_host()


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-llama"])
def test_a_token_start_equals_those_tokens_in_front(arch):
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")
    base = load(ModelConfig(arch)).model.eval()
    model = copy.deepcopy(base)
    length, vocab = 4, base.get_input_embeddings().num_embeddings
    torch.manual_seed(seed)
    attach(model, HOST.adapters.build("prefix", length=length, init="tokens"))
    torch.manual_seed(seed)
    tokens = torch.randint(vocab, (1, length))  # the draw the start made
    x = torch.randint(vocab, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got = model(input_ids=x).logits
        want = base(input_ids=torch.cat([tokens.expand(2, -1), x], 1)).logits[:, length:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert model.training is False  # the start's forward left the mode as it found it


def test_a_token_start_keeps_training_mode():
    model = load(ModelConfig("tiny-llama")).model.train()
    attach(model, HOST.adapters.build("prefix", length=3, init="tokens"))
    assert model.training


def test_a_token_start_through_the_mlp_is_refused():
    with pytest.raises(ValidationError, match="init='tokens'.*reparameterize = true"):
        attach(load(ModelConfig("tiny-llama")).model, HOST.adapters.build("prefix-mlp", init="tokens"))
