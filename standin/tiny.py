"""Small, randomly initialised Wan components built offline: tests, benchmarks and the mini model start here.

They are the real diffusers / transformers classes at small sizes, so every code path is the one the 14B model
takes. The tokenizer is byte-level (any text, no vocabulary to download) with T5's conventions (pad 0, eos 1).
"""

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

# Transformer sizes. head_dim must split into Wan's time/height/width RoPE parts (multiple of 6 works well).
TRANSFORMER_CONFIGS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=12, num_layers=2, ffn_dim=48, text_dim=32, freq_dim=32),
    "medium": dict(num_attention_heads=4, attention_head_dim=48, num_layers=4, ffn_dim=512, text_dim=64, freq_dim=64),
    # Wan2.1-T2V-14B and 1.3B (text_dim is UMT5-XXL's width).
    "14B": dict(num_attention_heads=40, attention_head_dim=128, num_layers=40, ffn_dim=13824, text_dim=4096),
    "1.3B": dict(num_attention_heads=12, attention_head_dim=128, num_layers=30, ffn_dim=8960, text_dim=4096),
}


def tiny_transformer(size: str = "tiny", seed: int = 0, **overrides) -> WanTransformer3DModel:
    config = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True, eps=1e-6)
    config.update(TRANSFORMER_CONFIGS[size], **overrides)
    torch.manual_seed(seed)
    return WanTransformer3DModel(**config).eval()


def tiny_vae(seed: int = 0, base_dim: int = 8, z_dim: int = 16) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # Non-trivial latent statistics, so that normalisation is exercised.
    latents_mean = (torch.randn(z_dim, generator=generator) * 0.1).tolist()
    latents_std = (1.0 + torch.rand(z_dim, generator=generator)).tolist()
    return AutoencoderKLWan(
        base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=latents_mean, latents_std=latents_std,
    ).eval()


def byte_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0-2 are <pad>, </s>, <unk>; every byte has its own id after them."""
    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(specials + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=model_max_length,
    )


def tiny_text_encoder(d_model: int = 32, num_layers: int = 2, seed: int = 0) -> UMT5EncoderModel:
    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=len(byte_tokenizer()), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=num_layers,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def tiny_pipeline(seed: int = 0, size: str = "tiny", reference_size: int = 32, with_adapter: bool = True,
                  two_experts: bool = False, boundary_ratio: float = 0.875):
    """A complete StandInPipeline of tiny random components (text_dim matches the tiny text encoder). two_experts:
    a Wan2.2-like base, its low-noise `transformer_2` another random transformer, switched to below
    boundary_ratio * 1000 (Wan2.2-A14B's 0.875)."""
    from standin.models.adapter import StandInAdapter
    from standin.pipeline import StandInPipeline, standin_scheduler

    text_encoder = tiny_text_encoder(d_model=TRANSFORMER_CONFIGS[size]["text_dim"], seed=seed)
    pipe = StandInPipeline(
        tokenizer=byte_tokenizer(), text_encoder=text_encoder, vae=tiny_vae(seed), scheduler=standin_scheduler(),
        transformer=tiny_transformer(size, seed), reference_size=reference_size,
        transformer_2=tiny_transformer(size, seed + 1000) if two_experts else None,
        boundary_ratio=boundary_ratio if two_experts else None,
    )
    if with_adapter:
        for number, expert in enumerate(pipe._experts()):
            torch.manual_seed(seed + 1 + number)
            adapter = StandInAdapter.for_transformer(getattr(pipe, expert), rank=4)
            for lora in (m for m in adapter.modules() if hasattr(m, "up")):
                torch.nn.init.normal_(lora.up.weight, std=0.05)  # trained-like: B != 0
            pipe.set_standin_adapter(adapter, expert)
    pipe.set_progress_bar_config(disable=True)
    return pipe
