"""Device maps: accelerate's "auto" map, explicit layer ranges, disk offload (tiny checkpoints, CPU)."""

import pytest
import torch

from fuyu.model import generate, load_pretrained, logits
from fuyu.model.convert import convert
from fuyu.model.devices import PINNED, parse_device_map, parse_max_memory
from fuyu.testing.batches import make_batch
from fuyu.testing.checkpoint import make_checkpoint

VOCAB = 320
# hidden 128: embeddings + patch projection + head ≈ 1.7 MB, one block ≈ 0.8 MB in float32.
TIGHT = {"cpu": "3.6MB"}  # room for the pinned modules and one block: the rest goes to disk


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("dm"), hidden=128, heads=4, layers=4,
                           vocab_size=VOCAB, tokenizer=False, shards=2, seed=7)


@pytest.fixture(scope="module")
def batch():
    return make_batch([(2, 3, 5), (1, 2, 3)], VOCAB, seed=1)


@pytest.fixture(scope="module")
def in_memory(ckpt, batch):
    model = load_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        return logits(model, batch), generate(model, batch, 6, eos_id=-1)


def same_logits(got, want):
    """float32 logits within the fidelity contract's 1e-4: weights read back from disk by accelerate
    sit at other addresses than the loader's, and oneDNN's GEMMs may round them in another order
    (3.9e-6 apart on a 2-core AMD EPYC family 26 model 2; equal on other runs and CPUs)."""
    assert (got - want).abs().max().item() <= 1e-4


def on_disk(model) -> set[str]:
    return {name.rsplit(".", 2)[0] for name, p in model.named_parameters() if p.device.type == "meta"}


def test_auto_map_with_disk_offload_gives_the_in_memory_logits(ckpt, batch, in_memory, tmp_path):
    model = load_pretrained(ckpt, dtype=torch.float32, device_map="auto", max_memory=TIGHT,
                            offload_folder=tmp_path)
    offloaded = on_disk(model)
    assert offloaded and not any(name.startswith(PINNED) for name in offloaded)
    with torch.no_grad():
        same_logits(logits(model, batch), in_memory[0])
    assert torch.equal(generate(model, batch, 6, eos_id=-1), in_memory[1])
    assert not any(tmp_path.iterdir())  # 16-bit tensors are read from the checkpoint's own shards


def test_explicit_map_of_layer_ranges(ckpt, batch, in_memory):
    dm = {"embed_tokens": "cpu", "vision_embed_tokens": "cpu", "layers.0-1": "cpu",
          "layers.2-3": "disk", "final_layernorm": "disk", "lm_head": "cpu"}
    model = load_pretrained(ckpt, dtype=torch.float32, device_map=dm)
    assert {n.split(".")[1] for n in on_disk(model) if n.startswith("layers.")} == {"2", "3"}
    with torch.no_grad():
        same_logits(logits(model, batch), in_memory[0])


def test_map_that_leaves_a_module_out_or_offloads_a_pinned_one_is_refused(ckpt):
    with pytest.raises(ValueError, match="does not place 'final_layernorm"):
        load_pretrained(ckpt, device_map={"embed_tokens": "cpu", "vision_embed_tokens": "cpu",
                                          "layers": "cpu", "lm_head": "cpu"})
    with pytest.raises(ValueError, match="puts lm_head on disk"):
        load_pretrained(ckpt, device_map={"": "cpu", "lm_head": "disk"})
    with pytest.raises(ValueError, match="no module named 'layers.8'"):
        load_pretrained(ckpt, device_map={"": "cpu", "layers.8-9": "cpu"})


def test_quantized_auto_map_quantizes_resident_layers_and_offloads_the_rest_16bit(ckpt, batch, in_memory, tmp_path):
    model = load_pretrained(ckpt, dtype=torch.float32, quantization="int8", device_map="auto",
                            max_memory={"cpu": "2.2MB"})
    kinds = {name: type(block.mlp.dense_h_to_4h).__name__ for name, block in model.layers.named_children()}
    assert "Int8Linear" in kinds.values() and "Linear" in kinds.values()
    with torch.no_grad():
        assert (logits(model, batch) - in_memory[0]).abs().max().item() < 0.5


def test_prequantized_layers_offloaded_to_disk_are_dequantized_into_the_offload_folder(
        ckpt, batch, in_memory, tmp_path):
    out = convert(ckpt, tmp_path / "int8", quantization="int8", dtype="float32")
    dm = {"": "cpu", "layers.3": "disk"}
    with pytest.raises(ValueError, match="pass offload_folder"):
        load_pretrained(out, dtype=torch.float32, device_map=dm)
    model = load_pretrained(out, dtype=torch.float32, device_map=dm, offload_folder=tmp_path / "off")
    assert any(p.name.startswith("layers.3.") for p in (tmp_path / "off").iterdir())
    with torch.no_grad():
        assert (logits(model, batch) - in_memory[0]).abs().max().item() < 0.5


def test_max_memory_without_a_device_map_is_refused(ckpt):
    with pytest.raises(ValueError, match="max_memory only applies"):
        load_pretrained(ckpt, max_memory={"cpu": "1GB"})


def test_cli_spellings_of_device_maps_and_memory():
    assert parse_device_map("auto") == "auto"
    assert parse_device_map("embed_tokens=0, layers.0-17=cuda:1,lm_head=cpu,layers.30=disk") == {
        "embed_tokens": 0, "layers.0-17": 1, "lm_head": "cpu", "layers.30": "disk"}
    assert parse_max_memory("0=20GiB,cuda:1=10GiB,cpu=30GiB") == {0: "20GiB", 1: "10GiB", "cpu": "30GiB"}
    with pytest.raises(ValueError, match="name=device pairs"):
        parse_max_memory("20GiB")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_map_across_gpu_cpu_and_disk_matches_cpu(ckpt, batch, in_memory, tmp_path):
    model = load_pretrained(ckpt, dtype=torch.float32, device_map="auto",
                            max_memory={0: "3.6MB", "cpu": "1.7MB"}, offload_folder=tmp_path)
    with torch.no_grad():
        assert (logits(model, batch).cpu() - in_memory[0]).abs().max().item() < 1e-4
