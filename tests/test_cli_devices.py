"""--device-map / --max-memory / --offload-folder on the CLI, the memory plan (will it fit, batches
cut to fit), and `fuyu convert`'s byte progress (tiny checkpoints, CPU, in-process through the real entry point)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from fuyu import memory, pipeline
from tests.helpers import FakeRunner, fuyu, png
from fuyu.testing.checkpoint import make_checkpoint

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
    monkeypatch.setattr(pipeline, "load_runner", lambda spec, *args: runners.append(real(spec, *args)) or runners[-1])
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
    from fuyu.model.convert import convert

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
    monkeypatch.setattr(pipeline, "load_runner", lambda spec, *args: specs.append(spec) or FakeRunner())
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
    monkeypatch.setattr(pipeline, "load_runner", lambda spec, *args: specs.append(spec) or FakeRunner())
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


# --- will it fit? -----------------------------------------------------------------------------------

def fake_shard(path: Path, tensors: dict[str, tuple[str, int]]) -> None:
    """A safetensors header for {name: (dtype, nbytes)} with no data behind it: only headers are read."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": [nbytes], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)


def test_weight_bytes_come_from_headers_scaled_to_the_dtype(tmp_path):
    ckpt = tmp_path / "fake-8b"
    ckpt.mkdir()
    # 9.4e9 bf16 weights in two shards, 1e8 float32 ones and 1e6 int8 bytes (kept as stored).
    fake_shard(ckpt / "model-00001-of-00002.safetensors", {"a": ("BF16", 10_000_000_000),
                                                          "b": ("F32", 400_000_000)})
    fake_shard(ckpt / "model-00002-of-00002.safetensors", {"c": ("BF16", 8_800_000_000),
                                                          "q": ("I8", 1_000_000)})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors", "q": "model-00002-of-00002.safetensors"}}))
    assert memory.weight_bytes(ckpt, "bfloat16") == 18_800_000_000 + 200_000_000 + 1_000_000
    assert memory.weight_bytes(ckpt, "float32") == 37_600_000_000 + 400_000_000 + 1_000_000


def test_weight_bytes_of_a_real_tiny_checkpoint(tiny):
    from safetensors import safe_open

    from fuyu.model.weights import shard_files

    stored = 0
    for shard in shard_files(tiny):
        with safe_open(shard, "pt") as f:
            stored += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert memory.weight_bytes(tiny, "float32") == stored  # make_checkpoint stores float32
    assert memory.weight_bytes(tiny, "bfloat16") == stored // 2
    assert memory.weight_bytes(tiny, "bfloat16", "int4") < memory.weight_bytes(tiny, "bfloat16", "int8") < stored // 2


def test_a_run_that_cannot_fit_stops_in_one_line_naming_what_fits(tiny, images, monkeypatch):
    from fuyu.model import memory as plan
    from fuyu.model.weights import read_config

    cfg, tokens = read_config(tiny), plan.worst_tokens(6)
    f32, bf16 = (plan.need(cfg, memory.weight_bytes(tiny, dt), 1, tokens, dt).total for dt in ("float32", "bfloat16"))
    room = int((f32 + bf16) / 2 / (1 - plan.SAFETY))  # bfloat16 fits, float32 does not
    monkeypatch.setattr(memory, "available_memory", lambda: room)
    loads = []
    monkeypatch.setattr("fuyu.model.load_pretrained", lambda *a, **k: loads.append(a))
    r = fuyu("caption", *images, "-m", tiny, *FAST)
    assert r.code == 2 and loads == [] and len(r.err.strip().splitlines()) == 1, r.err
    assert r.err.startswith(f"error: {tiny} needs ") and "in float32" in r.err
    assert f"{room / 1e9:.1f} GB of memory is available" in r.err
    assert f"use --dtype bfloat16 ({bf16 / 1e9:.1f} GB)" in r.err and "--device-map auto --offload-folder" in r.err


@pytest.mark.parametrize("args,available", [(["--device-map", "auto"], 1_000), ([], 10**15), ([], None)])
def test_no_stop_when_mapped_fitting_or_unknown(args, available, tiny, images, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: available)
    r = fuyu("caption", images[0], "-m", tiny, *FAST, *args)
    assert r.code == 0, r.err


def test_batches_are_cut_to_what_fits_and_an_item_too_big_alone_fails_alone(tiny, tmp_path, monkeypatch):
    from fuyu import runner

    shots = [png(tmp_path / f"s{i}.png", (120, 90), (10 * i, 200, 30)) for i in range(5)]
    big = png(tmp_path / "big.png", (1200, 900), (1, 2, 3))
    real = memory.BatchBudget.after_load

    def small(model, device, max_new_tokens):  # room for two rows of the small images, not one big
        budget = real(model, device, max_new_tokens)
        budget.room = budget.bytes(2, budget.tokens((120, 90)))
        return budget
    monkeypatch.setattr(memory.BatchBudget, "after_load", staticmethod(small))
    sizes = []
    real_batch = runner.Runner._generate_batch
    monkeypatch.setattr(runner.Runner, "_generate_batch",
                        lambda self, items, gen: (sizes.append(len(items)), real_batch(self, items, gen))[1])
    r = fuyu("caption", *shots, big, "-m", tiny, *FAST, "--batch-size", "4")
    recs = {Path(rec["path"]).name: rec for rec in r.records()}
    assert r.code == 1 and sizes == [2, 2, 1], (r.code, sizes, r.err)
    assert all("error" not in recs[f"s{i}.png"] for i in range(5))
    assert "needs" in recs["big.png"]["error"] and "left after loading the model" in recs["big.png"]["error"]


def test_available_memory_is_meminfo_capped_by_the_cgroup(tmp_path):
    from fuyu.model import memory as plan

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:  1000 kB\nMemAvailable:   12100000 kB\n")
    assert plan.meminfo_available(meminfo) == 12_100_000 * 1024
    none = tmp_path / "no-cgroup"
    assert plan.available(meminfo, none, tmp_path) == 12_100_000 * 1024
    # cgroup v2: the job's own limit, less what it holds that cannot be reclaimed (page cache can)
    root, own = tmp_path / "v2", tmp_path / "v2" / "slurm" / "job7"
    own.mkdir(parents=True)
    (own / "memory.max").write_text("8589934592\n")
    (own / "memory.current").write_text(str(3 << 30))
    (own / "memory.stat").write_text(f"anon {2 << 30}\ninactive_file {1 << 30}\n")
    (root / "slurm" / "memory.max").write_text("max\n")
    proc = tmp_path / "cgroup-v2"
    proc.write_text("0::/slurm/job7\n")
    assert plan.cgroup_room(proc, root) == (8 << 30) - (2 << 30)
    assert plan.available(meminfo, proc, root) == (6 << 30)
    (root / "slurm" / "memory.max").write_text(str(5 << 30))  # a tighter parent wins
    assert plan.cgroup_room(proc, root) == (5 << 30)
    # cgroup v1: the memory controller's hierarchy; its "unlimited" is a huge number
    v1 = tmp_path / "v1" / "memory" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(4 << 30))
    (v1 / "memory.usage_in_bytes").write_text(str(1 << 30))
    proc.write_text("12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
    assert plan.cgroup_room(proc, tmp_path / "v1") == (3 << 30)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712")
    assert plan.cgroup_room(proc, tmp_path / "v1") is None
    meminfo.write_text("MemTotal:       24576000 kB\n")
    assert plan.available(meminfo, proc, tmp_path / "v1") is None


def test_the_plan_for_fuyu_8b():
    from fuyu.model import FuyuConfig
    from fuyu.model import memory as plan
    from fuyu.preprocess.patches import image_tokens

    cfg = FuyuConfig()  # Fuyu-8B
    assert image_tokens(1920, 1080) == 2340 and image_tokens(3840, 2160) == 2340 and image_tokens(640, 480) == 368
    assert plan.kv_bytes(cfg, 1, 1, "bfloat16") == 9 * 2**16  # 0.5625 MiB a token
    assert 1.28 * 2**30 < plan.kv_bytes(cfg, 1, 2340, "bfloat16") < 1.29 * 2**30  # a full-HD screenshot
    weights = 9_408_238_592 * 2
    one = plan.need(cfg, weights, 1, plan.worst_tokens(64), "bfloat16")
    assert 20.5e9 < one.total < 21.5e9 and plan.fits(one.total, 23 * 2**30)
    assert not plan.fits(plan.need(cfg, 2 * weights, 1, 400, "float32").total, 23 * 2**30)
    assert plan.quantized_bytes("int8", (16384, 4096), "bfloat16") == 16384 * 4096 + 16384 * 4
    assert plan.quantized_bytes("int4", (16384, 4096), "bfloat16") == 16384 * 2048 + 32 * 16384 * 4


# --- fuyu convert ----------------------------------------------------------------------------------

def test_convert_reports_bytes_up_to_the_total(tmp_path):
    from fuyu.model.convert import convert

    src = make_checkpoint(tmp_path / "src", hidden=128, vocab_size=320, tokenizer=False)
    calls = []
    convert(src, tmp_path / "out", shard_size="200KB", on_bytes=lambda done, total: calls.append((done, total)))
    totals = {total for _, total in calls}
    done = [d for d, _ in calls]
    assert len(totals) == 1 and done[0] == 0 and done == sorted(done) and done[-1] == totals.pop()
    assert done[-1] == memory.weight_bytes(src, "bfloat16")  # the default output dtype


def test_convert_draws_a_byte_bar_on_a_terminal(tmp_path):
    src = make_checkpoint(tmp_path / "src", hidden=128, vocab_size=320, tokenizer=False)
    r = fuyu("convert", src, tmp_path / "out", "--shard-size", "200KB",
             env={"TTY_COMPATIBLE": "1", "NO_COLOR": "1", "COLUMNS": "120"})
    assert r.code == 0, r.err
    total = memory.weight_bytes(src, "bfloat16") / 1e6
    assert f"{total:.1f}/{total:.1f} MB" in r.err and "wrote shard 2" in r.err
    r = fuyu("convert", src, tmp_path / "out2", "--shard-size", "200KB")  # not a terminal: no bar
    assert r.code == 0 and "MB/s" not in r.err and "wrote shard 2" in r.err
