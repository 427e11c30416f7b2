"""Documents and many questions end to end (issue 12), on the tiny random checkpoint: PDF pages and
TIFF frames as records, several questions or targets per image with the image prefilled once, and
resume per (file, page, task, prompt)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.documents import encrypted_pdf, write_mixed_folder, write_pdf, write_tiff
from tests.helpers import cli_env, fuyu, fuyu_cmd, kill_after_lines, png

FAST = ["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "6"]


def texts(r) -> dict:
    assert r.code in (0, 1), r.err
    return {(x["id"], x["prompt"]): x.get("text") for x in r.records()}


def test_a_pdf_gives_one_record_per_page_equal_to_captioning_each_page_as_a_png(tiny_model, tmp_path):
    from fuyu.preprocess import list_pages, load_page

    pdf = write_pdf(tmp_path / "report.pdf", 3)
    r = fuyu("caption", pdf, "-m", tiny_model, *FAST)
    recs = r.records()
    assert r.code == 0 and [(x["page"], x["pages"], x["id"]) for x in recs] == [
        (n, 3, f"{pdf}#page={n}") for n in (1, 2, 3)]
    pngs = []
    for page in list_pages(pdf):
        pngs.append(tmp_path / f"page{page.page}.png")
        load_page(page).save(pngs[-1])
    as_png = fuyu("caption", *pngs, "-m", tiny_model, *FAST).records()
    assert [x["text"] for x in recs] == [x["text"] for x in as_png]
    assert [(x["width"], x["height"]) for x in recs] == [(x["width"], x["height"]) for x in as_png]
    one = fuyu("caption", pdf, "--pages", "2", "-m", tiny_model, *FAST).records()
    assert [(x["page"], x["text"]) for x in one] == [(2, recs[1]["text"])]


def test_a_folder_of_pdfs_pngs_and_a_multipage_tiff_gives_every_page_and_broken_pdfs_are_records(
        tiny_model, tmp_path):
    d = tmp_path / "docs"
    write_pdf(d / "a.pdf", 2)
    write_pdf(d / "b.pdf", 1)
    png(d / "c.png", (50, 40))
    write_tiff(d / "d.tif")
    (d / "locked.pdf").write_bytes(encrypted_pdf(b"secret"))
    (d / "cut.pdf").write_bytes((d / "a.pdf").read_bytes()[:300])
    r = fuyu("caption", d, "-m", tiny_model, *FAST)
    assert r.code == 1
    ids = sorted(x["id"] for x in r.records() if "error" not in x)
    assert ids == sorted([f"{d}/a.pdf#page=1", f"{d}/a.pdf#page=2", f"{d}/b.pdf#page=1", f"{d}/c.png",
                          f"{d}/d.tif#page=1", f"{d}/d.tif#page=2", f"{d}/d.tif#page=3"])
    errors = {Path(x["path"]).name: x["error"] for x in r.records() if "error" in x}
    assert set(errors) == {"locked.pdf", "cut.pdf"} and "password-protected" in errors["locked.pdf"]
    assert all(line.startswith("error: ") for line in r.err.splitlines()[:-1])


def test_three_questions_equal_three_single_runs_and_the_references_greedy_answers(tiny_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    image = png(tmp_path / "chart.png", (90, 60), (30, 120, 200))
    questions = ["What is it?", "Which colour?", "How many bars are there in the chart?"]
    many = fuyu("ask", image, *sum((["-q", q] for q in questions), []), "-m", tiny_model, *FAST)
    assert many.code == 0, many.err
    got = [x["text"] for x in many.records()]
    assert [x["prompt"] for x in many.records()] == [q + "\n" for q in questions]
    alone = [fuyu("ask", image, q, "-m", tiny_model, *FAST).records()[0]["text"] for q in questions]
    assert got == alone

    from PIL import Image

    proc = transformers.FuyuProcessor.from_pretrained(tiny_model)
    ref = transformers.FuyuForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    for q, ours in zip(questions, got):
        inputs = proc(text=q + "\n", images=Image.open(image).convert("RGB"), return_tensors="pt")
        out = ref.generate(**inputs, max_new_tokens=6, do_sample=False)
        answer = proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        assert ours == answer.strip()


def test_several_targets_give_the_boxes_of_separate_runs(tiny_model, tmp_path):
    shot = png(tmp_path / "shot.png", (120, 80), (240, 240, 240))
    both = fuyu("bbox", shot, "--find", "Save", "--find", "Cancel", "-m", tiny_model, *FAST).records()
    alone = [fuyu("bbox", shot, t, "-m", tiny_model, *FAST).records()[0] for t in ("Save", "Cancel")]
    assert [(x["text"], x["boxes"]) for x in both] == [(x["text"], x["boxes"]) for x in alone]


def test_a_second_question_into_the_same_file_runs_and_overwrite_redoes_only_its_own(tiny_model, tmp_path):
    image = png(tmp_path / "a.png", (60, 40))
    out = tmp_path / "answers.jsonl"
    assert fuyu("ask", image, "-q", "Total?", "-o", out, "-m", tiny_model, *FAST).code == 0
    r = fuyu("ask", image, "-q", "Total?", "-q", "Date?", "-o", out, "-m", tiny_model, *FAST)
    assert r.code == 0 and "1 already done" in r.err
    before = out.read_text().splitlines()
    assert [json.loads(x)["prompt"] for x in before] == ["Total?\n", "Date?\n"]
    r = fuyu("ask", image, "-q", "Date?", "-o", out, "--overwrite", "-m", tiny_model, *FAST)
    after = out.read_text().splitlines()
    assert r.code == 0 and len(after) == 2 and after[0] == before[0]  # Total? untouched


def test_resume_holds_from_another_working_directory(tiny_model, tmp_path, monkeypatch):
    shots = tmp_path / "shots"
    png(shots / "a.png"), png(shots / "b.png", (30, 20))
    out = tmp_path / "caps.jsonl"
    monkeypatch.chdir(tmp_path)
    assert fuyu("caption", "shots", "-o", out, "-m", tiny_model, *FAST).code == 0
    monkeypatch.chdir(shots)
    r = fuyu("caption", ".", "-o", out, "-m", tiny_model, *FAST)
    assert r.code == 0 and "nothing to do, 2 already done" in r.err


def test_sigkill_with_pages_and_questions_then_rerun_gives_every_triple_once(tiny_model, tmp_path):
    d = write_mixed_folder(tmp_path / "docs")
    out = tmp_path / "answers.jsonl"
    cmd = fuyu_cmd("ask", d, "-q", "Total?", "-q", "Date?", "-m", tiny_model, "--dtype", "float32",
                   "--max-new-tokens", "24", "-b", "2", "-o", out)
    done = kill_after_lines(cmd, out, 4)
    assert 4 <= done < 22, done
    rerun = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    keys = [(x["path"], x.get("page"), x["prompt"]) for x in map(json.loads, out.read_text().splitlines())]
    expected = {(str(d / "a.pdf"), n, q) for n in (1, 2, 3) for q in ("Total?\n", "Date?\n")}
    expected |= {(str(d / f"img{i}.png"), None, q) for i in range(8) for q in ("Total?\n", "Date?\n")}
    assert len(keys) == len(set(keys)) == 22 and set(keys) == expected
    more = fuyu("ask", d, "-q", "Vendor?", "-o", out, "-m", tiny_model, *FAST)
    assert more.code == 0 and len(out.read_text().splitlines()) == 33


def test_questions_share_one_prefill_of_the_image(tiny_model, tmp_path, monkeypatch):
    from fuyu import model as engine

    calls = []
    real = engine.encode_prefix
    monkeypatch.setattr(engine, "encode_prefix", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    image = png(tmp_path / "a.png", (90, 60))
    r = fuyu("ask", image, "-q", "A?", "-q", "B?", "-q", "C?", "-m", tiny_model, *FAST)
    assert r.code == 0 and len(r.records()) == 3
    assert calls == [torch.Size([1, 2 * (3 + 1)])]  # one image prefix: 2 rows of 3 patches + newline


def test_draw_on_pdf_pages_writes_one_copy_per_page(tiny_model, tmp_path):
    from PIL import Image

    pdf = write_pdf(tmp_path / "doc.pdf", 2)
    r = fuyu("bbox", pdf, "--find", "Total", "--draw", tmp_path / "drawn", "-m", tiny_model, *FAST)
    assert r.code == 0, r.err
    drawn = sorted((tmp_path / "drawn").iterdir())
    assert [p.name for p in drawn] == ["doc.page-1.png", "doc.page-2.png"]
    with Image.open(drawn[0]) as im:
        assert im.size == (r.records()[0]["width"], r.records()[0]["height"])
