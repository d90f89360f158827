"""The diffusers internals Stand-In relies on (listed in standin/models/reference.py's docstring), each checked, so
that a diffusers upgrade that changes one fails here, by name, before it changes a video."""

import inspect

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from standin.tiny import tiny_transformer


def test_transformer_parts_the_reference_stream_calls():
    transformer = tiny_transformer()
    for name in ("blocks", "patch_embedding", "rope", "condition_embedder"):
        assert hasattr(transformer, name), name
    for name in ("timesteps_proj", "time_embedder", "act_fn", "time_proj"):
        assert hasattr(transformer.condition_embedder, name), name
    rope = transformer.rope
    assert tuple(rope.patch_size) == tuple(transformer.config.patch_size) == (1, 2, 2)
    assert rope.t_dim + rope.h_dim + rope.w_dim == transformer.config.attention_head_dim and rope.max_seq_len
    cos, sin = rope(torch.zeros(1, 16, 2, 4, 6))
    assert cos.shape == sin.shape == (1, 2 * 2 * 3, 1, transformer.config.attention_head_dim)


def test_block_forward_signature_and_its_attention_calls():
    assert list(inspect.signature(WanTransformerBlock.forward).parameters) == [
        "self", "hidden_states", "encoder_hidden_states", "temb", "rotary_emb"]
    transformer = tiny_transformer()
    block, calls = transformer.blocks[0], []

    class Recorder:
        def __init__(self, name, base):
            self.name, self.base = name, base

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            calls.append((self.name, encoder_hidden_states is None, attention_mask is None, rotary_emb is None))
            output = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
            return torch.zeros_like(output) if self.name == "attn2" else output

    block.attn1.processor = Recorder("attn1", block.attn1.processor)
    block.attn2.processor = Recorder("attn2", block.attn2.processor)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    x, text = torch.randn(1, 6, dim), torch.randn(1, 3, dim)
    temb = torch.randn(1, 6, dim)
    rotary = transformer.rope(torch.zeros(1, 16, 1, 4, 6))
    with torch.no_grad():
        block(x, text, temb, rotary)
        # attn2 adds its output to the residual: a zero output leaves the stream as self-attention + FFN made it
        zero_cross = block(x, text, temb, rotary)
        block.attn2.processor = block.attn2.processor.base
        with_cross = block(x, text, temb, rotary)
    assert calls[:2] == [("attn1", True, True, False), ("attn2", False, True, True)]
    assert not torch.equal(zero_cross, with_cross)


def test_attention_modules_have_the_projections_we_use():
    attn = tiny_transformer().blocks[0].attn1
    for name in ("to_q", "to_k", "to_v", "norm_q", "norm_k", "heads", "to_out"):
        assert hasattr(attn, name), name
    assert len(attn.to_out) == 2
    attn.fuse_projections()
    assert attn.fused_projections and hasattr(attn, "to_qkv")


def test_processor_attributes_diffusers_sets():
    transformer = tiny_transformer()
    processor = transformer.blocks[0].attn1.processor
    assert hasattr(processor, "_attention_backend") and hasattr(processor, "_parallel_config")
    transformer.set_attention_backend("native")
    assert processor._attention_backend is not None


def test_dispatch_attention_takes_batch_tokens_heads_dim():
    q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 7, 3, 8), torch.randn(2, 7, 3, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(dispatch_attention_fn(q, k, v), expected, atol=1e-6)
