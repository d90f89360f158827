"""Speed and memory switches keep the result: bf16, fp8 layerwise storage, fused QKV, torch.compile."""

import pytest
import torch
from conftest import relative_error

from standin.models import StandInModel, cast_like_pretrained
from standin.tiny import tiny_transformer

# Rounding budgets: bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%), and errors grow through the
# blocks; we measured 0.7% here. fp8 e4m3 weights keep 3 bits (2^-4): the base model alone measures 1.6%.
# The bounds are twice what was measured: loose enough for other CPUs, tight enough to catch a stream
# computed in the wrong precision or skipped (Stand-In vs base differs by 3% on these weights).
BF16_TOLERANCE = 0.015
FP8_TOLERANCE = 0.035


def lowered(model, dtype):
    transformer = cast_like_pretrained(tiny_transformer(), dtype)
    return StandInModel(transformer, model.adapter)


def half_inputs(inputs):
    return {k: v.bfloat16() if k != "timestep" else v for k, v in inputs.items()}


@torch.no_grad()
def test_bf16_stays_within_rounding_of_fp32(standin_model, inputs):
    expected = standin_model(**inputs)[0]
    result = lowered(standin_model, torch.bfloat16)(**half_inputs(inputs))[0]
    assert result.dtype == torch.bfloat16
    assert relative_error(result.float(), expected) <= BF16_TOLERANCE


@torch.no_grad()
def test_fp8_layerwise_storage_costs_what_it_costs_the_base(standin_model, inputs):
    expected = standin_model(**inputs)[0]
    model = lowered(standin_model, torch.bfloat16)
    model.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert model.transformer.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    result = model(**half_inputs(inputs))[0]
    assert relative_error(result.float(), expected) <= FP8_TOLERANCE
    # The adapter is untouched by the casting: LoRA math stays float32.
    assert all(p.dtype == torch.float32 for p in model.adapter.parameters())


@pytest.mark.slow
@torch.no_grad()
def test_compiled_repeated_blocks_give_the_same_result(standin_model, inputs):
    """compile_repeated_blocks compiles each block's forward, reference pass and cached attention included."""
    plain = {k: v for k, v in inputs.items() if k != "reference_latents"}
    expected, base = standin_model(**inputs)[0], standin_model(**plain)[0]
    standin_model.transformer.compile_repeated_blocks(fullgraph=True)
    with standin_model.reference(inputs["reference_latents"], inputs["hidden_states"].shape, cache=True):
        recording, cached = standin_model(**plain)[0], standin_model(**plain)[0]
    assert relative_error(recording, expected) <= 1e-5 and relative_error(cached, expected) <= 1e-5
    assert relative_error(standin_model(**plain)[0], base) <= 1e-5  # the no-reference branch compiles too
