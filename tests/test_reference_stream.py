"""The reference stream on the diffusers Wan transformer (docs/method.md sections 2-4)."""

import math

import pytest
import torch
from conftest import randomize_lora_up, relative_error
from reference_impl import standin_forward

from standin.models import StandInAdapter, StandInModel, reference_rope
from standin.models.reference import apply_rope
from standin.tiny import TRANSFORMER_CONFIGS, tiny_transformer

# fp32 on CPU: two different but equivalent computation orders agree to ~3e-7 here; 1e-5 leaves margin
# for other BLAS builds while still catching any real difference in the math (those are > 1e-3).
TOLERANCE = 1e-5


def without_reference(inputs):
    return {k: v for k, v in inputs.items() if k != "reference_latents"}


def plain(model, inputs, adapter_weights=None, **kwargs):
    """The independent implementation (tests/reference_impl.py) on the same weights and inputs."""
    return standin_forward(
        model.transformer.state_dict(), dict(model.transformer.config),
        model.adapter.state_dict() if adapter_weights is None else adapter_weights,
        inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
        inputs.get("reference_latents"), **kwargs,
    )


@torch.no_grad()
def test_no_reference_is_the_base_model_bit_for_bit(standin_model, inputs):
    base = tiny_transformer()  # same seed: same weights, never touched by Stand-In
    expected = base(**without_reference(inputs), return_dict=False)[0]
    assert torch.equal(standin_model(**without_reference(inputs))[0], expected)
    standin_model(**inputs)  # a forward with a reference in between must leave nothing behind
    assert torch.equal(standin_model(**without_reference(inputs))[0], expected)


@torch.no_grad()
def test_matches_independent_plain_pytorch_implementation(standin_model, inputs):
    assert relative_error(standin_model(**inputs)[0], plain(standin_model, inputs)) <= TOLERANCE
    base = standin_model(**without_reference(inputs))[0]
    assert relative_error(base, plain(standin_model, without_reference(inputs))) <= TOLERANCE


@torch.no_grad()
def test_restriction_and_lora_are_what_the_implementation_checks(standin_model, inputs):
    """The comparison above can fail: the unrestricted ablation and a wrong LoRA both disagree clearly."""
    ours = standin_model(**inputs)[0]
    assert relative_error(ours, plain(standin_model, inputs, restricted=False)) > 1e-3
    zero_lora = {k: torch.zeros_like(v) for k, v in standin_model.adapter.state_dict().items()}
    assert relative_error(ours, plain(standin_model, inputs, adapter_weights=zero_lora)) > 1e-3


def cached_forward(model, inputs, stream_inputs=None):
    """Forward `inputs` inside a cached reference stream opened for `stream_inputs` (default: the same), after a
    first forward that records the cache; returns (output, stream)."""
    stream_inputs = stream_inputs or inputs
    with model.reference(stream_inputs["reference_latents"], stream_inputs["hidden_states"].shape,
                         cache=True) as stream:
        model(**without_reference(stream_inputs))
        return model(**without_reference(inputs))[0], stream


@torch.no_grad()
def test_reference_stream_independent_of_video_timestep_and_prompt(standin_model, inputs):
    _, stream = cached_forward(standin_model, inputs)
    generator = torch.Generator().manual_seed(5)
    variants = [
        inputs,
        {**inputs, "hidden_states": torch.randn(inputs["hidden_states"].shape, generator=generator)},
        {**inputs, "timestep": torch.tensor([999.0, 1.0])},
        {**inputs, "encoder_hidden_states": torch.randn(inputs["encoder_hidden_states"].shape, generator=generator)},
    ]
    for variant in variants:
        _, joint_kv = plain(standin_model, variant, return_reference_kv=True)
        for (cached_key, cached_value), (key, value) in zip(stream.keys_values, joint_kv):
            for sample in range(key.shape[0]):
                assert relative_error(cached_key[0], key[sample]) <= TOLERANCE
                assert relative_error(cached_value[0], value[sample]) <= TOLERANCE


@torch.no_grad()
def test_cached_forward_equals_uncached_exactly(standin_model, inputs):
    """The same code computes the reference either way; the cache only skips recomputing it."""
    cached, stream = cached_forward(standin_model, inputs)
    assert stream.recorded and torch.equal(cached, standin_model(**inputs)[0])
    # The same cache serves another timestep and prompt (the next step, the other guidance branch).
    other = {**inputs, "timestep": torch.tensor([10.0, 10.0]),
             "encoder_hidden_states": inputs["encoder_hidden_states"].flip(0)}
    assert torch.equal(cached_forward(standin_model, other, inputs)[0], standin_model(**other)[0])


@torch.no_grad()
def test_the_cache_runs_the_reference_pass_once(standin_model, inputs):
    calls = []
    for lora in standin_model.adapter.modules():
        if hasattr(lora, "up"):
            lora.register_forward_hook(lambda *args: calls.append(1))
    per_forward = 3 * len(standin_model.adapter.blocks)
    with standin_model.reference(inputs["reference_latents"], inputs["hidden_states"].shape, cache=True):
        for _ in range(3):
            standin_model(**without_reference(inputs))
    assert len(calls) == per_forward
    with standin_model.reference(inputs["reference_latents"], inputs["hidden_states"].shape, cache=False):
        for _ in range(3):
            standin_model(**without_reference(inputs))
    assert len(calls) == per_forward * 4


def ablation_model(**variant):
    torch.manual_seed(0)
    model = StandInModel(tiny_transformer(), StandInAdapter.for_transformer(tiny_transformer(), 4, **variant))
    randomize_lora_up(model.adapter)
    return model


@torch.no_grad()
def test_vanilla_attention_ablation_matches_the_independent_implementation(inputs):
    model = ablation_model(attention="vanilla")
    ours = model(**inputs)[0]
    assert relative_error(ours, plain(model, inputs, restricted=False)) <= TOLERANCE
    assert relative_error(ours, plain(model, inputs)) > 1e-3
    with pytest.raises(ValueError, match="nothing to cache"):
        with model.reference(inputs["reference_latents"], inputs["hidden_states"].shape, cache=True):
            pass


@torch.no_grad()
def test_shared_positions_ablation_matches_the_independent_implementation(inputs):
    model = ablation_model(positions="shared")
    ours = model(**inputs)[0]
    assert relative_error(ours, plain(model, inputs, shared_positions=True)) <= TOLERANCE
    assert relative_error(ours, plain(model, inputs)) > 1e-3


@torch.no_grad()
def test_a_stream_for_another_video_size_is_refused(standin_model, inputs):
    with standin_model.reference(inputs["reference_latents"], (1, 16, 3, 4, 4)):
        with pytest.raises(ValueError, match="video grid"):
            standin_model(**without_reference(inputs))


@torch.no_grad()
def test_untrained_adapter_still_changes_the_output(inputs):
    """B = 0 adds nothing to the projections, but video queries still attend to the reference keys."""
    torch.manual_seed(0)
    model = StandInModel(tiny_transformer(), rank=4)
    assert all(torch.count_nonzero(p) == 0 for n, p in model.adapter.named_parameters() if n.endswith("up.weight"))
    base = model(**without_reference(inputs))[0]
    assert relative_error(model(**inputs)[0], base) > 1e-3


def test_reference_rope_rotates_by_positions_minus1_h_plus_j_w_plus_k():
    transformer = tiny_transformer()
    rope, head_dim = transformer.rope, transformer.config.attention_head_dim
    video = (3, 5, 7)  # post-patch f, h, w
    reference = (2, 3)
    cos, sin = reference_rope(rope, reference, video)
    theta = 10000.0
    # One unit vector per channel pair; pair p of axis a rotates by position_a * theta^(-2i/d_a).
    axis_dim = 2 * (head_dim // 6)
    dims = [head_dim - 2 * axis_dim, axis_dim, axis_dim]
    for token, (j, k) in enumerate((j, k) for j in range(reference[0]) for k in range(reference[1])):
        positions = (-1, video[1] + j, video[2] + k)
        start = 0
        for axis, dim in enumerate(dims):
            for i in range(dim // 2):
                channel = start + 2 * i
                vector = torch.zeros(1, 1, 1, head_dim)
                vector[..., channel] = 1.0
                rotated = apply_rope(vector, cos[:, token : token + 1], sin[:, token : token + 1])
                angle = positions[axis] * theta ** (-2 * i / dim)
                assert math.isclose(rotated[0, 0, 0, channel].item(), math.cos(angle), abs_tol=1e-6)
                assert math.isclose(rotated[0, 0, 0, channel + 1].item(), math.sin(angle), abs_tol=1e-6)
            start += dim


def test_video_rope_through_our_rotation_matches_the_base_tables():
    """apply_rope on the base model's own video tables is the base model's rotation (positions (i, j, k))."""
    transformer = tiny_transformer()
    latents = torch.zeros(1, 16, 2, 4, 6)
    cos, sin = transformer.rope(latents)
    x = torch.randn(1, cos.shape[1], 2, 12)
    from reference_impl import grid_positions, rope_angles, rotate

    expected = rotate(x, rope_angles(grid_positions(2, 2, 3), 12))
    assert torch.allclose(apply_rope(x, cos, sin), expected, atol=1e-6)


def test_14B_adapter_has_157286400_parameters():
    with torch.device("meta"):
        base = tiny_transformer("14B")
        adapter = StandInAdapter.for_transformer(base)
    assert adapter.rank == 128 and adapter.dim == 5120
    assert sum(p.numel() for p in adapter.parameters()) == 157_286_400
    assert TRANSFORMER_CONFIGS["14B"]["num_layers"] == 40


def test_gradients_reach_only_the_adapter_when_base_is_frozen(standin_model, inputs):
    standin_model.freeze_base()
    standin_model(**inputs)[0].square().mean().backward()
    assert all(p.grad is None for p in standin_model.transformer.parameters())
    last = len(standin_model.adapter.blocks) - 1
    for name, parameter in standin_model.adapter.named_parameters():
        if name.startswith(f"blocks.{last}.self_attn.q_loras"):
            # the last block's reference queries feed nothing: frozen, and no gradient could reach them
            assert not parameter.requires_grad and parameter.grad is None
        else:
            assert parameter.grad is not None and torch.count_nonzero(parameter.grad) > 0, name


def test_gradient_checkpointing_gives_the_same_gradients(inputs):
    """diffusers' own checkpointing of the blocks: backward recomputes each block, reference pass included."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = StandInModel(tiny_transformer(), rank=4).freeze_base()
        randomize_lora_up(model.adapter)
        if checkpointing:
            model.transformer.enable_gradient_checkpointing()
        with model.reference(inputs["reference_latents"], inputs["hidden_states"].shape):
            model(**without_reference(inputs))[0].square().mean().backward()
        results.append([p.grad.clone() for p in model.adapter.parameters() if p.requires_grad])
    for plain_grad, checkpointed in zip(*results):
        assert torch.equal(plain_grad, checkpointed)


def test_checkpointing_needs_backward_inside_the_reference(standin_model, inputs):
    standin_model.freeze_base().transformer.enable_gradient_checkpointing()
    with pytest.raises(RuntimeError, match="backward must run inside the reference"):
        standin_model(**inputs)


@torch.no_grad()
def test_fused_qkv_and_attention_backend_keep_the_result(standin_model, inputs):
    expected = standin_model(**inputs)[0]
    standin_model.transformer.set_attention_backend("native")
    processor = standin_model.transformer.blocks[0].attn1.processor
    assert processor._attention_backend == processor.base_processor._attention_backend
    assert torch.equal(standin_model(**inputs)[0], expected)
    standin_model.transformer.fuse_qkv_projections()
    assert relative_error(standin_model(**inputs)[0], expected) <= TOLERANCE


def test_lora_initialisation_is_the_published_one():
    """A ~ normal with standard deviation 1/rank, B = 0 (docs/method.md section 2)."""
    torch.manual_seed(0)
    adapter = StandInAdapter(dim=512, num_layers=1, rank=16)
    down = adapter.blocks[0].self_attn.q_loras.down.weight
    assert abs(down.std().item() * 16 - 1) < 0.05 and abs(down.mean().item()) < 0.01
    assert torch.count_nonzero(adapter.blocks[0].self_attn.q_loras.up.weight) == 0


# ---- several identities -------------------------------------------------------------------------------------
def two_references(inputs):
    generator = torch.Generator().manual_seed(11)
    return [inputs["reference_latents"], torch.randn(inputs["reference_latents"].shape, generator=generator)]


@torch.no_grad()
def test_two_references_match_the_independent_implementation(standin_model, inputs):
    references = two_references(inputs)
    ours = standin_model(**{**inputs, "reference_latents": references})[0]
    assert relative_error(ours, plain(standin_model, {**inputs, "reference_latents": references})) <= TOLERANCE
    # and it is not the one-reference result, nor the second reference put at the first one's positions
    assert relative_error(ours, standin_model(**inputs)[0]) > 1e-3
    overlapping = {**inputs, "reference_latents": references}
    with standin_model.reference(references[1], inputs["hidden_states"].shape):
        alone = standin_model(**without_reference(overlapping))[0]
    assert relative_error(ours, alone) > 1e-3


@torch.no_grad()
def test_a_list_of_one_reference_is_the_one_reference_path(standin_model, inputs):
    expected = standin_model(**inputs)[0]
    assert torch.equal(standin_model(**{**inputs, "reference_latents": [inputs["reference_latents"]]})[0], expected)


@torch.no_grad()
def test_cache_is_exact_with_several_references(standin_model, inputs):
    several = {**inputs, "reference_latents": two_references(inputs) + [inputs["reference_latents"].flip(-1)]}
    cached, stream = cached_forward(standin_model, several)
    assert stream.recorded and torch.equal(cached, standin_model(**several)[0])


@torch.no_grad()
def test_too_many_references_for_the_rope_table_are_refused(inputs):
    torch.manual_seed(0)
    model = StandInModel(tiny_transformer(rope_max_seq_len=16), rank=4)  # video h = w = 4-5, references 4 x 4
    references = [inputs["reference_latents"]] * 2
    model(**{**inputs, "reference_latents": references})  # h + 2 * 4 <= 16: fits
    with pytest.raises(ValueError, match="3 reference"):
        model(**{**inputs, "reference_latents": references * 2})
