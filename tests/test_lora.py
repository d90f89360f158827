"""LoRAs on the base, composed with Stand-In: diffusers' own loader, the scale honoured, on tiny models.

The published infer_with_lora.py merges the LoRA into the base weights (W + B A) before Stand-In is attached, so the
LoRA acts on the video and on the reference projections. Here PEFT wraps the Linear layers instead; the tests hold
it to the merged model W + s B A (to 1e-5), with and without a reference, for every file format users have.
"""


import pytest
import torch
from safetensors.torch import save_file

from conftest import SIZES, noise, reference_image, relative_error, run
from standin.lora import LoraFileError, PRESETS, apply_preset, check_lora, load_loras, parse_lora_argument, set_scales
from standin.models.reference import ReferenceStream, StandInCrossAttention, StandInSelfAttention
from standin.tiny import tiny_pipeline, tiny_transformer

pytestmark = pytest.mark.usefixtures("one_thread")

RANK = 2
# diffusers module name -> the original Wan name (community / lightx2v files) and the musubi / kohya name part.
TARGETS = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}


def lora_weights(transformer, seed=0, alpha=None, bias=False, std=0.3):
    """{diffusers module name: (A [r, in], B [out, r], alpha, bias delta or None)} for every target of every block."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for index in range(len(transformer.blocks)):
        for target in TARGETS:
            module = transformer.get_submodule(f"blocks.{index}.{target}")
            down = torch.randn(RANK, module.in_features, generator=generator) * std
            up = torch.randn(module.out_features, RANK, generator=generator) * std
            delta_b = torch.randn(module.out_features, generator=generator) * std if bias else None
            weights[f"blocks.{index}.{target}"] = (down, up, alpha, delta_b)
    return weights


def write_lora(weights, path, fmt):
    state = {}
    for name, (down, up, alpha, delta_b) in weights.items():
        index, target = name.split(".", 2)[1], name.split(".", 2)[2]
        if fmt == "diffusers":
            state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = down, up
        elif fmt in ("community", "lightx2v"):
            base = f"diffusion_model.blocks.{index}.{TARGETS[target]}"
            if fmt == "community":
                state[f"{base}.lora_A.weight"], state[f"{base}.lora_B.weight"] = down, up
            else:
                state[f"{base}.lora_down.weight"], state[f"{base}.lora_up.weight"] = down, up
                state[f"{base}.alpha"] = torch.tensor(float(alpha))
                state[f"{base}.diff_b"] = delta_b
                state[f"diffusion_model.blocks.{index}.self_attn.norm_q.diff"] = torch.zeros(24)  # dropped (zeros)
        elif fmt == "kohya":
            base = f"lora_unet_blocks_{index}_{TARGETS[target].replace('.', '_')}"
            state[f"{base}.lora_down.weight"], state[f"{base}.lora_up.weight"] = down, up
            state[f"{base}.alpha"] = torch.tensor(float(alpha))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def merge(pipe, weights, scale, expert="transformer"):
    """The published semantics: W <- W + s (alpha / r) B A, b <- b + s diff_b, in the base weights."""
    transformer = getattr(pipe, expert)
    with torch.no_grad():
        for name, (down, up, alpha, delta_b) in weights.items():
            module = transformer.get_submodule(name)
            factor = scale * (1.0 if alpha is None else alpha / RANK)
            module.weight += factor * (up @ down)
            if delta_b is not None:
                module.bias += scale * delta_b
    return pipe


def adapter_state(pipe):
    return {k: v.clone() for k, v in pipe.adapters["transformer"].state_dict().items()}


FORMATS = {"diffusers": {}, "community": {}, "kohya": {"alpha": 4.0}, "lightx2v": {"alpha": 1.0, "bias": True}}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_equals_the_merged_base_with_and_without_reference(fmt, tmp_path):
    pipe = tiny_pipeline()
    weights = lora_weights(pipe.transformer, **FORMATS[fmt])
    path = write_lora(weights, tmp_path / f"{fmt}.safetensors", fmt)
    before = adapter_state(pipe)
    names = load_loras(pipe, [(path, 0.7)])
    assert names == ["lora_0"]
    merged = merge(tiny_pipeline(), weights, 0.7)
    for reference in (None, reference_image()):
        ours, expected = run(pipe, reference), run(merged, reference)
        assert relative_error(ours, expected) < 1e-5, (fmt, reference is None)
    # The LoRA moved the video, and the Stand-In adapter's own weights were not touched.
    assert relative_error(run(tiny_pipeline()), run(merged)) > 1e-3
    assert all(torch.equal(v, before[k]) for k, v in adapter_state(pipe).items())


def test_scale_zero_is_the_base_bit_for_bit_and_unloading_restores_it(tmp_path):
    pipe, plain = tiny_pipeline(), tiny_pipeline()
    reference = reference_image()
    path = write_lora(lora_weights(pipe.transformer, bias=True, alpha=1.0), tmp_path / "l.safetensors", "lightx2v")
    names = load_loras(pipe, [(path, 0.0)])
    for ref in (None, reference):
        assert torch.equal(run(pipe, ref), run(plain, ref))
    set_scales(pipe, {names[0]: 1.0})
    assert not torch.equal(run(pipe, reference), run(plain, reference))
    pipe.unload_lora_weights()
    for ref in (None, reference):
        assert torch.equal(run(pipe, ref), run(plain, ref))


def test_processors_survive_a_lora_load_and_the_reference_sees_the_lora(tmp_path):
    pipe = tiny_pipeline()
    processors = [(block.attn1.processor, block.attn2.processor) for block in pipe.transformer.blocks]
    load_loras(pipe, [(write_lora(lora_weights(pipe.transformer), tmp_path / "l.safetensors", "diffusers"), 1.0)])
    for block, (self_attn, cross_attn) in zip(pipe.transformer.blocks, processors):
        assert block.attn1.processor is self_attn and isinstance(self_attn, StandInSelfAttention)
        assert block.attn2.processor is cross_attn and isinstance(cross_attn, StandInCrossAttention)
        assert type(block.attn1.to_q).__module__.startswith("peft")  # PEFT wrapped the Linear, not the processor
    # The reference keys come through the LoRA'd projections: a LoRA on attn1.to_k alone changes them.
    pipe2 = tiny_pipeline()
    only_k = {k: v for k, v in lora_weights(pipe2.transformer).items() if k.endswith("attn1.to_k")}
    recorded = {}

    def keys_of(p):
        original = ReferenceStream.reference_kv

        def spy(self, index, *args, **kwargs):
            kv = original(self, index, *args, **kwargs)
            recorded.setdefault(id(p), {})[index] = kv[0].clone()
            return kv
        ReferenceStream.reference_kv = spy
        try:
            run(p, reference_image(), num_inference_steps=1)
        finally:
            ReferenceStream.reference_kv = original
        return recorded[id(p)][0]

    plain_keys = keys_of(tiny_pipeline())
    load_loras(pipe2, [(write_lora(only_k, tmp_path / "k.safetensors", "diffusers"), 1.0)])
    assert relative_error(keys_of(pipe2), plain_keys) > 1e-3


def test_several_loras_each_at_its_scale(tmp_path):
    pipe = tiny_pipeline()
    a, b = lora_weights(pipe.transformer, seed=1), lora_weights(pipe.transformer, seed=2)
    load_loras(pipe, [(write_lora(a, tmp_path / "a.safetensors", "diffusers"), 0.5),
                      (write_lora(b, tmp_path / "b.safetensors", "community"), -0.25)])
    expected = merge(merge(tiny_pipeline(), a, 0.5), b, -0.25)
    reference = reference_image()
    assert relative_error(run(pipe, reference), run(expected, reference)) < 1e-5


def test_wan22_a_lora_per_expert(tmp_path):
    def two_experts():
        pipe = tiny_pipeline()
        pipe.transformer_2 = tiny_transformer(seed=7)
        pipe.register_to_config(boundary_ratio=0.875)
        from standin.models.adapter import StandInAdapter
        pipe.set_standin_adapter(StandInAdapter.for_transformer(pipe.transformer_2, rank=4), "transformer_2")
        return pipe

    pipe = two_experts()
    high, low = lora_weights(pipe.transformer, seed=3), lora_weights(pipe.transformer_2, seed=4)
    load_loras(pipe, [(write_lora(high, tmp_path / "high.safetensors", "diffusers"), 0.8)])
    names = load_loras(pipe, [(write_lora(low, tmp_path / "low.safetensors", "community"), 0.6)], "transformer_2")
    assert names == ["lora_low_0"]
    expected = merge(merge(two_experts(), high, 0.8), low, 0.6, "transformer_2")
    reference = reference_image()
    assert relative_error(run(pipe, reference, num_inference_steps=4),
                          run(expected, reference, num_inference_steps=4)) < 1e-5
    with pytest.raises(ValueError, match="no transformer_2"):
        load_loras(tiny_pipeline(), [(tmp_path / "low.safetensors", 1.0)], "transformer_2")


def test_bad_files_are_refused_before_anything_loads(tmp_path):
    pipe = tiny_pipeline()
    other = tiny_transformer("medium")
    wrong = write_lora(lora_weights(other), tmp_path / "medium.safetensors", "diffusers")
    with pytest.raises(LoraFileError, match="another base") as error:
        load_loras(pipe, [(wrong, 1.0)])
    assert "\n" not in str(error.value)
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    with pytest.raises(LoraFileError, match="not a LoRA file"):
        load_loras(pipe, [(tmp_path / "text.safetensors", 1.0)])
    save_file({"blocks.0.attn1.to_q.weight": torch.zeros(24, 24)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(LoraFileError, match="not a LoRA file"):
        load_loras(pipe, [(tmp_path / "weights.safetensors", 1.0)])
    with pytest.raises(FileNotFoundError):
        load_loras(pipe, [(tmp_path / "missing.safetensors", 1.0)])
    state = {"transformer.blocks.0.attn1.to_nothing.lora_A.weight": torch.zeros(2, 24),
             "transformer.blocks.0.attn1.to_nothing.lora_B.weight": torch.zeros(24, 2)}
    with pytest.raises(LoraFileError, match="no linear layer"):
        check_lora(state, pipe.transformer)
    # A good file after bad ones, in one call: nothing of the call was loaded.
    good = write_lora(lora_weights(pipe.transformer), tmp_path / "good.safetensors", "diffusers")
    with pytest.raises(LoraFileError):
        load_loras(pipe, [(good, 1.0), (wrong, 1.0)])
    assert pipe.get_list_adapters() == {}


def test_lora_arguments():
    assert parse_lora_argument("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_argument("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert parse_lora_argument("C:\\loras\\style.safetensors") == ("C:\\loras\\style.safetensors", 1.0)
    assert parse_lora_argument("a:b.safetensors:-1") == ("a:b.safetensors", -1.0)
    with pytest.raises(ValueError, match="finite"):
        parse_lora_argument("x.safetensors:nan")


def test_lightx2v_preset_one_forward_per_step_and_the_reference_recorded_once():
    pipe = tiny_pipeline()
    settings = apply_preset(pipe, "lightx2v")
    assert settings == {"num_inference_steps": 4, "guidance_scale": 1.0}
    # lightx2v's distill schedule: timesteps [1000, 750, 500, 250], shifted by 5.
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25])
    expected = 1000 * 5 * sigmas / (1 + 4 * sigmas)
    assert torch.allclose(pipe._set_timesteps(4, "cpu"), expected)
    forwards, embeds = [], []
    pipe.transformer.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    original = ReferenceStream._embed
    ReferenceStream._embed = lambda self, batch: (embeds.append(batch), original(self, batch))[1]
    try:
        pipe(prompt="a man waves", reference_image=reference_image(), **SIZES, latents=noise(), output_type="latent",
             preprocess_reference=False, **settings)
    finally:
        ReferenceStream._embed = original
    assert forwards == [1, 1, 1, 1] and len(embeds) == 1
    with pytest.raises(ValueError, match="unknown preset"):
        apply_preset(pipe, "turbo")
    assert set(PRESETS) == {"lightx2v"}
