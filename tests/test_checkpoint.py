"""Adapter files: official .ckpt, community safetensors, ours; strict validation with specific errors."""

import pickle

import pytest
import torch
from conftest import randomize_lora_up
from safetensors.torch import load_file, save_file

from standin.checkpoint import AdapterFileError, convert, load_adapter, read_state_dict, save_adapter
from standin.models import StandInAdapter, StandInModel
from standin.tiny import tiny_transformer

RANK = 4


def official_state_dict(transformer, only=None, seed=0):
    """Official key names and shapes; B is zero except for `only` = (block, projection), if given."""
    generator = torch.Generator().manual_seed(seed)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    state = {}
    for i in range(transformer.config.num_layers):
        for p in "qkv":
            state[f"blocks.{i}.self_attn.{p}_loras.down.weight"] = torch.randn(RANK, dim, generator=generator) / RANK
            up = torch.randn(dim, RANK, generator=generator) * 0.1
            state[f"blocks.{i}.self_attn.{p}_loras.up.weight"] = up if only in (None, (i, p)) else up * 0
    return state


def output(transformer, adapter, inputs):
    with torch.no_grad():
        return StandInModel(transformer, adapter)(**inputs)[0]


def test_official_ckpt_loads_into_the_right_block_and_projection(tmp_path, inputs):
    transformer = tiny_transformer()
    for target in [(1, "k"), (0, "v"), (0, "q")]:
        state = official_state_dict(transformer, only=target)
        torch.save(state, tmp_path / "standin.ckpt")
        loaded = load_adapter(tmp_path / "standin.ckpt", transformer)
        # The same numbers put by hand into the named block and projection give the same video, to the bit.
        by_hand = StandInAdapter.for_transformer(transformer, rank=RANK)
        block, projection = target
        for i, block_adapter in enumerate(by_hand.blocks):
            for p in "qkv":
                lora = getattr(block_adapter.self_attn, f"{p}_loras")
                lora.down.weight.data = state[f"blocks.{i}.self_attn.{p}_loras.down.weight"].clone()
                lora.up.weight.data = state[f"blocks.{i}.self_attn.{p}_loras.up.weight"].clone()
        assert torch.equal(output(transformer, loaded, inputs), output(transformer, by_hand, inputs))
        # ...and the nonzero B really acts: zeroing it in that one place changes the video.
        getattr(by_hand.blocks[block].self_attn, f"{projection}_loras").up.weight.data.zero_()
        assert not torch.equal(output(transformer, loaded, inputs), output(transformer, by_hand, inputs))


def test_ckpt_under_state_dict_and_community_safetensors_load_the_same(tmp_path, inputs):
    transformer = tiny_transformer()
    state = official_state_dict(transformer)
    torch.save({"state_dict": state}, tmp_path / "nested.ckpt")
    save_file({f"diffusion_model.{k}": v for k, v in state.items()}, str(tmp_path / "community.safetensors"))
    torch.save(state, tmp_path / "flat.ckpt")
    outputs = [output(transformer, load_adapter(tmp_path / name, transformer), inputs)
               for name in ("flat.ckpt", "nested.ckpt", "community.safetensors")]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_our_safetensors_round_trip_and_convert(tmp_path, inputs):
    transformer = tiny_transformer()
    adapter = randomize_lora_up(StandInAdapter.for_transformer(transformer, rank=RANK))
    path = save_adapter(adapter, tmp_path / "ours.safetensors", metadata={"steps": 3000})
    assert torch.equal(output(transformer, load_adapter(path, transformer), inputs),
                       output(transformer, adapter, inputs))
    variant = StandInAdapter.for_transformer(transformer, rank=RANK, attention="vanilla", positions="shared")
    reloaded = load_adapter(save_adapter(variant, tmp_path / "ablation.safetensors"), transformer)
    assert (reloaded.attention, reloaded.positions) == ("vanilla", "shared")
    torch.save(official_state_dict(transformer), tmp_path / "official.ckpt")
    summary = convert(tmp_path / "official.ckpt", tmp_path / "converted.safetensors")
    assert summary == {"tensors": 6 * 2, "rank": RANK, "dim": 24, "num_layers": 2}
    converted = load_file(str(tmp_path / "converted.safetensors"))
    assert all(torch.equal(converted[k], v) for k, v in official_state_dict(transformer).items())


@pytest.mark.parametrize("mutate, message", [
    (lambda s: {k: torch.zeros(v.shape[0] if "down" in k else 48, v.shape[1] if "down" not in k else 48)
                for k, v in s.items()}, r"made for a base of width 48, but the base model is a base of width 24"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("blocks.1.self_attn.v_loras.up")}, "missing keys"),
    (lambda s: {**s, "blocks.0.self_attn.o_loras.down.weight": torch.zeros(1)}, "unexpected keys"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("blocks.1.")}, "1 blocks, but the base model has 2"),
    (lambda s: {**s, "blocks.0.self_attn.k_loras.up.weight": torch.zeros(24, RANK + 1)}, r"shape \[24, 5\]"),
])
def test_mismatched_adapters_fail_with_a_specific_error(tmp_path, mutate, message):
    transformer = tiny_transformer()
    torch.save(mutate(official_state_dict(transformer)), tmp_path / "bad.ckpt")
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(tmp_path / "bad.ckpt", transformer)


def test_a_14B_adapter_on_a_1_3B_base_names_both():
    with torch.device("meta"):
        base = tiny_transformer("1.3B")
        state = StandInAdapter(5120, 40, 128).state_dict()
    from standin.checkpoint import validate_state_dict

    with pytest.raises(AdapterFileError, match=r"Wan2.1-T2V-14B.*dim 5120.*Wan2.1-T2V-1.3B \(dim 1536\)"):
        validate_state_dict(state, base.config.num_attention_heads * base.config.attention_head_dim, 30)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused_not_executed(tmp_path, capsys):
    with open(tmp_path / "evil.ckpt", "wb") as handle:
        pickle.dump({"blocks.0.self_attn.q_loras.down.weight": Payload()}, handle)
    with pytest.raises(AdapterFileError, match="refused to unpickle"):
        read_state_dict(tmp_path / "evil.ckpt")
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("content, name", [(b"not a checkpoint", "junk.ckpt"), (b"\x00" * 64, "junk.safetensors")])
def test_corrupt_files_fail_clearly(tmp_path, content, name):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(AdapterFileError, match="cannot read adapter file|not a plain tensor"):
        read_state_dict(tmp_path / name)
    with pytest.raises(AdapterFileError, match="not found"):
        read_state_dict(tmp_path / "missing.ckpt")
