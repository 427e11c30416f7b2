"""--device-map / --max-memory / --offload-folder on the CLI (tiny checkpoints, CPU, in-process
through the real entry point)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuyu_cli import pipeline
from tests.test_cli import FakeRunner, fuyu, png
from tests.tiny_checkpoint import make_checkpoint

FAST = ["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "6"]
# hidden 64, vocab 1460 (the tiny tokenizer), float32: embeddings + patch projection + LM head
# ≈ 1.44 MB, pinned in memory; one block ≈ 0.2 MB. This leaves room for about two of the four.
TIGHT = "cpu=1.9MB"
EXPLICIT = ("embed_tokens=cpu, vision_embed_tokens=cpu, lm_head=cpu, layers.0-1=cpu, "
            "layers.2-3=disk, final_layernorm=disk")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("devices") / "x", layers=4, seed=3)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("images")
    return [png(d / "a.png", (64, 48), (10, 200, 30)), png(d / "b.png", (90, 40), (200, 20, 30))]


@pytest.fixture(scope="module")
def plain(tiny, images) -> dict[str, str]:
    r = fuyu("caption", *images, "-m", tiny, *FAST)
    assert r.code == 0, r.err
    return {rec["path"]: rec["text"] for rec in r.records()}


@pytest.fixture
def loaded(monkeypatch) -> list:
    """The runners the commands load (the real ones), to look at where the weights went."""
    runners = []
    real = pipeline.load_runner
    monkeypatch.setattr(pipeline, "load_runner", lambda spec: runners.append(real(spec)) or runners[-1])
    return runners


def on_disk(model) -> set[str]:
    """The blocks ("layers.3") and top-level modules whose weights accelerate reads from disk
    (left on the meta device)."""
    def unit(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]

    return {unit(name) for name, p in model.named_parameters() if p.device.type == "meta"}


def texts(run) -> dict[str, str]:
    assert run.code == 0, run.err
    return {rec["path"]: rec["text"] for rec in run.records()}


# --- device maps ----------------------------------------------------------------------------------

def test_auto_map_with_max_memory_offloads_layers_to_disk_and_captions_like_the_plain_run(
        tiny, images, plain, loaded, tmp_path, caplog):
    r = fuyu("caption", *images, "-m", tiny, *FAST, "--device-map", "auto", "--max-memory", TIGHT,
             "--offload-folder", tmp_path / "offload")
    assert texts(r) == plain
    offloaded = on_disk(loaded[0].model)
    assert "layers.3" in offloaded and "layers.0" not in offloaded  # part in memory, part on disk
    assert offloaded <= {"layers.1", "layers.2", "layers.3", "final_layernorm"}
    assert loaded[0].device == "cpu"
    # accelerate's "some parameters are on the meta device" is what was asked for: not shown
    assert not [rec for rec in caplog.records if rec.name.startswith("accelerate")]


def test_explicit_map_spelling_places_layer_ranges(tiny, images, plain, loaded):
    r = fuyu("caption", *images, "-m", tiny, *FAST, "--device-map", EXPLICIT)
    assert texts(r) == plain
    assert on_disk(loaded[0].model) == {"layers.2", "layers.3", "final_layernorm"}


def test_a_prequantized_checkpoint_sent_to_disk_needs_the_offload_folder(tiny, images, tmp_path):
    from model.convert import convert

    int8 = convert(tiny, tmp_path / "int8", quantization="int8")
    r = fuyu("caption", images[0], "-m", int8, *FAST, "--device-map", EXPLICIT)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "must be rewritten (dequantized)" in r.err and "add --offload-folder DIR" in r.err
    r = fuyu("caption", images[0], "-m", int8, *FAST, "--device-map", EXPLICIT,
             "--offload-folder", tmp_path / "off")
    assert r.code == 0 and r.records()[0]["new_tokens"] == 6, r.err
    assert any((tmp_path / "off").iterdir())


@pytest.mark.parametrize("command,extra", [("caption", []), ("ask", ["What is it?"]),
                                           ("bbox", ["Total"])])
def test_every_model_command_passes_the_options_on(command, extra, images, monkeypatch, tmp_path):
    specs = []
    monkeypatch.setattr(pipeline, "load_runner", lambda spec: specs.append(spec) or FakeRunner())
    monkeypatch.setenv("FUYU_MODEL", str(tmp_path))
    r = fuyu(command, images[0], *extra, "--device-map", "auto", "--max-memory", "0=20GiB, cpu=30GiB",
             "--offload-folder", tmp_path / "off")
    assert r.code == 0, r.err
    assert (specs[0].device_map, specs[0].max_memory, specs[0].offload_folder) == (
        "auto", {0: "20GiB", "cpu": "30GiB"}, tmp_path / "off")
    fuyu(command, images[0], *extra, "--device-map", "layers.0-17=cuda:1,lm_head=0,=cpu")
    assert specs[1].device_map == {"layers.0-17": 1, "lm_head": 0, "": "cpu"}
    assert specs[1].max_memory is None and specs[1].offload_folder is None


@pytest.mark.parametrize("args,says", [
    (["--device-map", "gpu"], "--device-map 'gpu': use name=device pairs"),
    (["--device-map", "layers.0-3=gpu"], "--device-map 'layers.0-3=gpu': unknown device"),
    (["--device-map", "auto", "--max-memory", "30GiB"], "--max-memory '30GiB': use name=device pairs"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "size 'lots' for cpu is not a size"),
    (["--device-map", "auto", "--max-memory", "tpu=1GB"], "--max-memory 'tpu=1GB': unknown device"),
    (["--max-memory", "cpu=1GB"], "--max-memory applies only with --device-map auto"),
    (["--device-map", "lm_head=cpu", "--max-memory", "cpu=1GB"], "applies only with --device-map auto"),
    (["--offload-folder", "off"], "--offload-folder applies only with --device-map"),
])
def test_bad_spellings_are_one_line_usage_errors_before_loading(args, says, images, monkeypatch):
    specs = []
    monkeypatch.setattr(pipeline, "load_runner", lambda spec: specs.append(spec) or FakeRunner())
    r = fuyu("caption", images[0], *args)
    assert r.code == 2 and specs == []
    assert len(r.err.strip().splitlines()) == 1, r.err
    assert r.err.startswith("error: ") and says in r.err and "e.g. --device-map auto" in r.err


def test_a_map_the_model_cannot_use_is_a_usage_error_too(tiny, images):
    r = fuyu("caption", images[0], "-m", tiny, *FAST, "--device-map", "layer.0-3=cpu")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "no module named 'layer.0'" in r.err and "e.g. --device-map auto" in r.err
    r = fuyu("caption", images[0], "-m", tiny, *FAST, "--device-map", "layers.0-3=cpu")
    assert r.code == 2 and "does not place 'embed_tokens'" in r.err, r.err
