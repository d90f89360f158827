import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from standin.models import StandInTransformer  # noqa: E402
from standin.tiny import tiny_transformer  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is several times faster than two fighting over a busy CPU. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize_lora_up(adapter, std=0.1, seed=0):
    """A trained adapter has B != 0; tests use random B so the LoRA path is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if name.endswith("up.weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return adapter


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def standin_model():
    torch.manual_seed(0)
    model = StandInTransformer(tiny_transformer(), rank=4)
    randomize_lora_up(model.adapter)
    return model


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(2, 16, 3, 8, 10, generator=generator),
        timestep=torch.tensor([700.0, 250.0]),
        encoder_hidden_states=torch.randn(2, 7, 32, generator=generator),
        reference_latents=torch.randn(1, 16, 1, 8, 8, generator=generator),
    )
