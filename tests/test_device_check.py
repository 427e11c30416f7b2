"""benchmarks/device_check.py runs its reduced (CPU, tiny model) version here, so the GPU check
cannot rot between the rare runs on a GPU machine."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the full check runs on GPUs: minutes, not seconds")
def test_reduced_device_check_writes_every_section(tmp_path, monkeypatch):
    from fuyu.benchmarks import device_check
    from fuyu.model import generate

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = tmp_path / "results.json"
    device_check.main([str(out)])
    res = json.loads(out.read_text())
    assert res["reduced"] is True
    sections = res["sections"]
    assert set(sections) == {"parity", "bnb", "full"}
    for name, section in sections.items():
        assert "error" not in section, (name, section.get("traceback"))
    assert sections["parity"]["ok"]
    assert sections["bnb"]["8bit"]["layer_modules"] == ["Linear8bitLt"]
    assert sections["bnb"]["4bit"]["layer_modules"] == ["Linear4bit"]
    full = sections["full"]
    assert full["decode_batch1_eager"]["ms_per_step"] > 0 and full["decode_batch1_compiled"]["ms_per_step"] > 0
    # bf16: equal ids are not promised, so the fraction is checked against the ids it counts, and
    # those against an eager generate of the same model here
    eager, compiled = (torch.tensor(full["decode_batch1_ids"][k]) for k in ("eager", "compiled"))
    assert eager.shape == compiled.shape == (1, 16)
    assert full["decode_batch1_compiled_vs_eager_same_ids"] == round((eager == compiled).float().mean().item(), 3)
    cfg, ids = device_check.full_config(False)
    model = device_check.random_model(cfg, torch.device("cpu"), torch.bfloat16)
    with torch.inference_mode():
        want = generate(model, device_check.photo_batch(cfg, 1, ids, torch.device("cpu")), 16, eos_id=-1)
    assert eager.tolist() == want.tolist()
    assert full["prefill_1920x1080"]["tokens"] > 50 and full["memory"]["sum_gbs"] > 0
