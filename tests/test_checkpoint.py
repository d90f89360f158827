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


@pytest.mark.parametrize("name", ["a.bin", "a.ckpt", "a.safetensors.tmp", "noext"])
def test_convert_writes_safetensors_only(tmp_path, name):
    transformer = tiny_transformer()
    torch.save(official_state_dict(transformer), tmp_path / "official.ckpt")
    with pytest.raises(AdapterFileError, match=r"safetensors only; name the output \*\.safetensors"):
        convert(tmp_path / "official.ckpt", tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official.ckpt"]


def test_the_extension_is_read_in_any_case(tmp_path, inputs):
    transformer = tiny_transformer()
    torch.save(official_state_dict(transformer), tmp_path / "official.ckpt")
    convert(tmp_path / "official.ckpt", tmp_path / "UPPER.SAFETENSORS")
    loaded = load_adapter(tmp_path / "UPPER.SAFETENSORS", transformer)
    reference = load_adapter(tmp_path / "official.ckpt", transformer)
    assert torch.equal(output(transformer, loaded, inputs), output(transformer, reference, inputs))


def test_refusals_never_advise_running_the_pickle(tmp_path):
    with open(tmp_path / "evil.ckpt", "wb") as handle:
        pickle.dump({"blocks.0.self_attn.q_loras.down.weight": Payload()}, handle)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    (tmp_path / "cut.ckpt").write_bytes(b"\x80\x02}q\x00(X")  # a pickle that stops in the middle
    for name in ("evil.ckpt", "junk.ckpt", "cut.ckpt"):
        with pytest.raises(AdapterFileError) as caught:
            read_state_dict(tmp_path / name)
        message = str(caught.value)
        assert "weights_only" not in message and "False" not in message, message
        assert "accepted: .safetensors files" in message


def test_an_empty_file_says_so(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("empty.ckpt", "empty.safetensors"):
        with pytest.raises(AdapterFileError, match=r"the file is empty \(0 bytes\)"):
            read_state_dict(tmp_path / name)


def test_a_folder_or_fifo_is_not_an_adapter(tmp_path):
    import os

    with pytest.raises(AdapterFileError, match="is a folder"):
        read_state_dict(tmp_path)
    os.mkfifo(tmp_path / "pipe.ckpt")
    with pytest.raises(AdapterFileError, match="named pipe"):
        read_state_dict(tmp_path / "pipe.ckpt")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_naming_the_tensor(tmp_path, bad):
    transformer = tiny_transformer()
    state = official_state_dict(transformer)
    state["blocks.1.self_attn.k_loras.up.weight"][3, 2] = bad
    torch.save(state, tmp_path / "diverged.ckpt")
    with pytest.raises(AdapterFileError, match=r"blocks\.1\.self_attn\.k_loras\.up\.weight has 1 NaN or infinite"):
        load_adapter(tmp_path / "diverged.ckpt", transformer)
    with pytest.raises(AdapterFileError, match="NaN or infinite"):
        convert(tmp_path / "diverged.ckpt", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_one_dimensional_down_weight_is_named(tmp_path):
    transformer = tiny_transformer()
    state = official_state_dict(transformer)
    state["blocks.0.self_attn.q_loras.down.weight"] = torch.zeros(24)
    torch.save(state, tmp_path / "flat.ckpt")
    message = r"q_loras\.down\.weight has shape \[24\]: a LoRA down weight is 2-D"
    with pytest.raises(AdapterFileError, match=message):
        convert(tmp_path / "flat.ckpt", tmp_path / "out.safetensors")
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(tmp_path / "flat.ckpt", transformer)


@pytest.mark.parametrize("failure", ["enospc", "safetensors"])
def test_disk_full_during_convert_writes_nothing(tmp_path, monkeypatch, failure):
    import errno

    import standin.checkpoint as checkpoint
    from safetensors import SafetensorError

    transformer = tiny_transformer()
    torch.save(official_state_dict(transformer), tmp_path / "official.ckpt")
    (tmp_path / "old.safetensors").write_bytes(b"the previous file")

    def full_disk(state_dict, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 100)  # part of a file, then the disk is full
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    for name in ("new.safetensors", "old.safetensors"):
        with pytest.raises(OSError, match=f"cannot write adapter .*{name}"):
            convert(tmp_path / "official.ckpt", tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official.ckpt", "old.safetensors"]
    assert (tmp_path / "old.safetensors").read_bytes() == b"the previous file"
