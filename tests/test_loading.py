"""Loading the original Wan release layout (converted in memory) and refusing what is not a Wan model."""

import re

import pytest
import torch
from safetensors.torch import save_file

from standin.loading import load_original_transformer, load_pipeline, original_t5_to_umt5
from standin.tiny import byte_tokenizer, tiny_text_encoder, tiny_transformer

# diffusers name -> Wan's original name (the original release's own layout), applied in order.
TO_ORIGINAL = [
    (r"^scale_shift_table", "head.modulation"), (r"^proj_out", "head.head"),
    (r"\.scale_shift_table$", ".modulation"),
    (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
    (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"condition_embedder\.time_proj", "time_projection.1"),
    (r"\.attn1\.", ".self_attn."), (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".o."), (r"\.to_([qkv])\.", r".\1."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."), (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"\.norm2\.", ".norm3."),  # the original calls the cross-attention norm norm3
]


def to_original(state_dict):
    converted = {}
    for key, value in state_dict.items():
        for pattern, replacement in TO_ORIGINAL:
            key = re.sub(pattern, replacement, key)
        converted[key] = value.clone()
    return converted


def test_original_transformer_shards_load_to_the_same_model(tmp_path, inputs):
    reference = tiny_transformer()
    original = to_original(reference.state_dict())
    assert "blocks.0.self_attn.o.weight" in original and "head.head.weight" in original
    keys = sorted(original)
    half = len(keys) // 2
    save_file({k: original[k] for k in keys[:half]}, str(tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    save_file({k: original[k] for k in keys[half:]}, str(tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    loaded = load_original_transformer(tmp_path, head_dim=reference.config.attention_head_dim)
    assert loaded.config.num_layers == 2 and loaded.config.ffn_dim == 48
    args = (inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"])
    with torch.no_grad():
        assert torch.equal(loaded(*args, return_dict=False)[0], reference(*args, return_dict=False)[0])


def test_original_umt5_keys_map_onto_transformers_umt5():
    encoder = tiny_text_encoder()
    hf = encoder.state_dict()
    to_original = {
        "layer.0.SelfAttention.q": "attn.q", "layer.0.SelfAttention.k": "attn.k", "layer.0.SelfAttention.v": "attn.v",
        "layer.0.SelfAttention.o": "attn.o", "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
        "layer.0.layer_norm": "norm1", "layer.1.layer_norm": "norm2", "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
        "layer.1.DenseReluDense.wi_1": "ffn.fc1", "layer.1.DenseReluDense.wo": "ffn.fc2",
    }
    original = {"token_embedding.weight": hf["shared.weight"], "norm.weight": hf["encoder.final_layer_norm.weight"]}
    for key, value in hf.items():
        match = re.match(r"encoder\.block\.(\d+)\.(.+)\.weight$", key)
        if match:
            original[f"blocks.{match[1]}.{to_original[match[2]]}.weight"] = value
    converted, config = original_t5_to_umt5(original)
    assert (config.num_layers, config.d_model, config.num_heads, config.d_ff) == (2, 32, 4, 64)
    from transformers import UMT5EncoderModel

    rebuilt = UMT5EncoderModel(config)
    converted["encoder.embed_tokens.weight"] = converted["shared.weight"]
    rebuilt.load_state_dict(converted, strict=True)
    tokens = byte_tokenizer()(["a man walks"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(**tokens).last_hidden_state, encoder(**tokens).last_hidden_state)
    with pytest.raises(KeyError, match="unexpected key"):
        original_t5_to_umt5({**original, "blocks.0.extra.weight": torch.zeros(1)})


def test_a_folder_that_is_no_wan_model_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="neither a Wan diffusers folder"):
        load_pipeline(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pipeline(tmp_path / "missing", device="cpu")
