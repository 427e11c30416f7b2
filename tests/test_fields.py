"""Named fields, typed answers under a grammar, scores (issue 25), on tiny random checkpoints:
unconstrained answers are noise, constrained ones must parse."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess

import pytest
import torch

from tests.documents import write_mixed_folder, write_pdf
from tests.helpers import cli_env, fuyu, fuyu_cmd, kill_after_lines, png

FAST = ["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "10"]
FIELDS = [
    {"name": "total", "question": "What is the total amount?", "type": "number"},
    {"name": "count", "question": "How many items?", "type": "integer"},
    {"name": "paid", "question": "Is it paid?", "type": "boolean"},
    {"name": "status", "question": "Status?", "type": "choice", "choices": ["paid", "unpaid", "overdue"]},
    {"name": "ref", "question": "Reference?", "type": "regex", "pattern": "[A-Z]{2}-[0-9]+"},
    {"name": "vendor", "question": "Who sent it?"},
]
PY = {"number": (int, float), "integer": (int,), "boolean": (bool,), "choice": (str,), "regex": (str,),
      "text": (str,)}


def _folder(tmp_path):
    d = tmp_path / "docs"
    write_pdf(d / "inv.pdf", 2)
    png(d / "a.png", (60, 40))
    png(d / "b.png", (48, 40), (20, 150, 30))
    return d


def _fields_file(tmp_path, fields=FIELDS):
    path = tmp_path / "fields.json"
    path.write_text(json.dumps(fields))
    return path


def _check_value(spec: dict, value) -> None:
    kind = spec.get("type", "text")
    assert isinstance(value, PY[kind]) and (kind == "boolean" or not isinstance(value, bool)), (spec, value)
    if kind == "choice":
        assert value in spec["choices"]
    if kind == "regex":
        assert re.fullmatch(spec["pattern"], value), value


def test_typed_fields_parse_in_jsonl_csv_and_parquet_with_one_row_per_page(tiny_model, tmp_path):
    d, fields = _folder(tmp_path), _fields_file(tmp_path)
    r = fuyu("ask", d, "--fields", fields, "-m", tiny_model, *FAST)
    assert r.code == 0, r.err
    recs = r.records()
    assert sorted(x["id"] for x in recs) == sorted([f"{d}/inv.pdf#page=1", f"{d}/inv.pdf#page=2",
                                                    f"{d}/a.png", f"{d}/b.png"])
    for rec in recs:
        assert set(rec["answers"]) == {f["name"] for f in FIELDS}
        for spec in FIELDS:
            value = rec["answers"][spec["name"]]
            if value is None:  # cut short by --max-new-tokens: null with a reason, never a bad string
                assert "max-new-tokens" in rec["reasons"][spec["name"]]
            else:
                _check_value(spec, value)
            assert rec["scores"][spec["name"]] <= 0

    c = fuyu("ask", d, "--fields", fields, "-m", tiny_model, *FAST, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(c.out)))
    assert len(rows) == 4 and c.code == 0
    assert list(rows[0])[:6] == ["path", "page", "pages", "id", "total", "total_score"]
    by_id = {x["id"]: x for x in recs}
    for row in rows:
        for spec in FIELDS:
            cell = row[spec["name"]]
            assert cell == ("" if by_id[row["id"]]["answers"][spec["name"]] is None else cell)
            if cell:
                value = json.loads(cell) if spec.get("type") in ("number", "integer", "boolean") else cell
                _check_value(spec, value)
            float(row[f"{spec['name']}_score"])

    import pyarrow as pa

    from fuyu.parts import read_records

    out = tmp_path / "parts"
    p = fuyu("ask", d, "--fields", fields, "-m", tiny_model, *FAST, "--format", "parquet", "--output-dir", out)
    assert p.code == 0, p.err
    import pyarrow.parquet as pq

    schema = pq.read_schema(str(next(out.glob("part-*.parquet"))))
    assert schema.field("total").type == pa.float64() and schema.field("count").type == pa.int64()
    assert schema.field("paid").type == pa.bool_() and schema.field("total_score").type == pa.float64()
    rows = list(read_records(str(out), "parquet"))
    assert len(rows) == 4
    for row in rows:
        assert row["total"] == by_id[row["id"]]["answers"]["total"]
        for spec in FIELDS:
            if row[spec["name"]] is not None:
                _check_value(spec, row[spec["name"]])


def test_one_typed_question_with_type_choices_or_pattern(tiny_model, tmp_path):
    image = png(tmp_path / "a.png", (60, 40))
    r = fuyu("ask", image, "Total?", "--type", "number", "-m", tiny_model, *FAST)
    assert r.code in (0, 1), r.err
    rec = r.records()[0]
    assert isinstance(rec.get("answer"), (int, float)) or "max-new-tokens" in rec["error"]
    r = fuyu("ask", image, "-q", "Paid?", "-q", "Due?", "--choices", "paid,unpaid", "-m", tiny_model, *FAST)
    assert r.code == 0 and {x["answer"] for x in r.records()} <= {"paid", "unpaid"}
    r = fuyu("ask", image, "Ref?", "--pattern", "[A-Z]{2}-[0-9]+", "-m", tiny_model, *FAST,
             "--max-new-tokens", "4", "--min-score", "-0.0001")
    assert r.code == 0 and re.fullmatch("[A-Z]{2}-[0-9]+", r.records()[0]["answer"])
    assert r.records()[0]["doubtful"] is True  # random weights: never that sure


@pytest.mark.parametrize("args, says", [
    (["--field", "=What?"], "empty name"),
    (["--field", "a=X?", "--field", "a=Y?"], "given twice"),
    (["--field", "a:money=X?"], "unknown type 'money'"),
    (["--field", "s:choice=X?"], "needs choices"),
    (["Q?", "--pattern", "[a-"], "invalid regex"),
    (["--field", "r:regex=X?", "--pattern", "(ab"], "invalid regex"),
    (["--field", "path=X?"], "record's own columns"),
    (["--field", "total=X?", "--field", "total_score=Y?"], "share a column"),
    (["--fields", "BAD"], "is not valid JSON"),
    (["--fields", "EMPTY"], "expected a list"),
    (["--fields", "CHOICELESS"], "needs choices"),
    (["--fields", "YAML"], "YAML"),
])
def test_bad_fields_are_one_line_and_exit_2(tiny_model, tmp_path, args, says):
    image = png(tmp_path / "a.png")
    files = {"BAD": ("f.json", "[{"), "EMPTY": ("f.json", "{}"), "YAML": ("f.yaml", "- name: a\n"),
             "CHOICELESS": ("f.json", json.dumps([{"name": "s", "question": "S?", "type": "choice"}]))}
    args = list(args)
    for i, a in enumerate(args):
        if a in files:
            name, text = files[a]
            (tmp_path / name).write_text(text)
            args[i] = str(tmp_path / name)
    r = fuyu("ask", image, *args, "-m", tiny_model, *FAST)
    assert r.code == 2 and r.out == ""
    assert r.err.startswith("error: ") and says in r.err and len(r.err.strip().splitlines()) == 1, r.err


def test_toml_fields_file_is_read(tiny_model, tmp_path):
    path = tmp_path / "fields.toml"
    path.write_text('[[field]]\nname = "paid"\nquestion = "Paid?"\ntype = "boolean"\n')
    r = fuyu("ask", png(tmp_path / "a.png"), "--fields", path, "-m", tiny_model, *FAST)
    assert r.code == 0 and isinstance(r.records()[0]["answers"]["paid"], bool)


# --- the constraint and the scores, at the model ------------------------------------------------

@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A tiny model with 300 more logits than its tokenizer has pieces (as "mid" has 262,144)."""
    from fuyu.testing.checkpoint import make_checkpoint
    from fuyu.testing.tokenizer import vocab_size

    return make_checkpoint(tmp_path_factory.mktemp("wide"), vocab_size=vocab_size() + 300, seed=3)


def _load(ckpt):
    from fuyu.model import load_pretrained
    from fuyu.model.constrain import Vocabulary
    from fuyu.preprocess import FuyuProcessor

    proc = FuyuProcessor.from_pretrained(ckpt)
    model = load_pretrained(ckpt, device="cpu", dtype=torch.float32)
    vocab = Vocabulary(proc.tokenizer.token_bytes(), model.config.eos_token_id, model.config.vocab_size)
    return model, proc, vocab


def _batch(proc, questions, size=(64, 48)):
    from PIL import Image

    image = Image.new("RGB", size, (200, 40, 40))
    return proc.collate([proc.prepare_one(image, q + "\n") for q in questions])


def test_constrained_greedy_equals_unconstrained_when_that_already_matches(wide_model):
    from fuyu.model import generate

    model, proc, vocab = _load(wide_model)
    tok = proc.tokenizer
    n = 6
    for q in ["What is it?", "Total?", "Who sent it?", "Date?", "Name?", "Where?", "Why?", "When?"]:
        batch = _batch(proc, [q])
        free = generate(model, batch, n)
        text = tok.decode(free[0])
        clean = all(tok.token_bytes()[i] is not None for i in free[0].tolist() if i < len(tok.pieces))
        if clean and int(free.max()) < len(tok.pieces) and text.isprintable() and "\ufffd" not in text:
            break
    else:
        pytest.fail("no question gave a plain-text greedy answer to build the case on")
    from fuyu.fields import Field

    # The free answer is one of the choices: the constraint must not change a single id.
    field = Field("x", q, "choice", (text, text + "zz", "other"))
    constrained, logp = generate(model, batch, n, constraints=[vocab.grammar(field.regex)], logprobs=True)
    assert constrained.tolist() == free.tolist()
    assert field.parse(tok.decode(constrained[0])) == text
    # and a constraint the free answer breaks changes the answer, which then parses
    other = Field("y", q, "integer")
    ids = generate(model, batch, n, constraints=[vocab.grammar(other.regex)])
    assert ids.tolist() != free.tolist() and isinstance(other.parse(tok.decode(ids[0])), int)


def test_scores_equal_log_probabilities_recomputed_from_full_sequence_logits(wide_model):
    from fuyu.fields import Field
    from fuyu.model import generate, logits

    model, proc, vocab = _load(wide_model)
    eos = model.config.eos_token_id
    batch = _batch(proc, ["Total?", "Who sent it?", "Ref?"])
    grammars = [vocab.grammar(Field("t", "", "number").regex), None,
                vocab.grammar(Field("r", "", "regex", pattern="[A-Z]{2}-[0-9]+").regex)]
    new, logp = generate(model, batch, 8, constraints=grammars, logprobs=True)
    assert int(new[[0, 2]].max()) < len(proc.tokenizer.pieces)  # undefined ids are masked off
    full = {"input_ids": torch.cat([batch.input_ids, new], 1), "image_patches": batch.image_patches,
            "attention_mask": torch.cat([batch.attention_mask, torch.ones_like(new)], 1)}
    T = batch.input_ids.shape[1]
    all_logits = logits(model, full)[:, T - 1:T - 1 + new.shape[1]].float()  # the logits that chose each id
    for row, grammar in enumerate(grammars):
        state = None if grammar is None else grammar.initial
        for i, token in enumerate(new[row].tolist()):
            step = all_logits[row, i]
            if grammar is not None:  # renormalised over the ids the grammar allowed at that step
                allowed = grammar.allowed(state, step.device)
                expected = step[token] - torch.logsumexp(step[allowed], 0)
                assert token in allowed.tolist()
                state = grammar.advance(state, token)
            else:
                expected = torch.log_softmax(step, 0)[token]
            assert abs(float(logp[row, i]) - float(expected)) < 1e-4, (row, i)
            if token == eos:
                break


def test_the_record_score_is_the_mean_over_the_answer_tokens(tiny_model, tmp_path):
    image = png(tmp_path / "a.png", (60, 40))
    r = fuyu("ask", image, "Total?", "-m", tiny_model, *FAST)
    rec = r.records()[0]
    from fuyu.model import generate, load_pretrained
    from fuyu.preprocess import FuyuProcessor
    from PIL import Image

    proc = FuyuProcessor.from_pretrained(tiny_model)
    model = load_pretrained(tiny_model, device="cpu", dtype=torch.float32)
    batch = proc.collate([proc.prepare_one(Image.open(image), "Total?\n")])
    new, logp = generate(model, batch, 10, logprobs=True)
    assert rec["new_tokens"] == new.shape[1] and abs(rec["score"] - float(logp[0].mean())) < 1e-4


# --- per document, resume --------------------------------------------------------------------------

def test_per_document_gives_one_row_and_each_answer_from_its_best_page(tiny_model, tmp_path):
    pdf = write_pdf(tmp_path / "inv.pdf", 2)
    fields = _fields_file(tmp_path, FIELDS[:3] + FIELDS[5:])
    pages = fuyu("ask", pdf, "--fields", fields, "-m", tiny_model, *FAST).records()
    assert len(pages) == 2
    by_page = {x["page"]: x for x in pages}
    r = fuyu("ask", pdf, "--fields", fields, "--per", "document", "-m", tiny_model, *FAST, "--format", "csv")
    assert r.code == 0, r.err
    rows = list(csv.DictReader(io.StringIO(r.out)))
    assert len(rows) == 1 and rows[0]["page"] == ""
    j = fuyu("ask", pdf, "--fields", fields, "--per", "document", "-m", tiny_model, *FAST).records()
    assert len(j) == 1
    winners = set()
    for spec in FIELDS[:3] + FIELDS[5:]:
        name = spec["name"]
        scores = {n: by_page[n]["scores"][name] for n in (1, 2) if by_page[n]["answers"][name] is not None}
        assert len(set(scores.values())) == len(scores)  # the pages' scores differ: one page wins
        best = max(scores, key=scores.get)
        winners.add(best)
        assert j[0]["answer_pages"][name] == best == int(rows[0][f"{name}_page"])
        assert j[0]["answers"][name] == by_page[best]["answers"][name]
        assert j[0]["scores"][name] == by_page[best]["scores"][name]


def test_a_rerun_with_one_more_field_computes_only_that_field(tiny_model, tmp_path, monkeypatch):
    from fuyu.runner import Runner

    d = _folder(tmp_path)
    out = tmp_path / "fields.jsonl"
    two = _fields_file(tmp_path, FIELDS[:2])
    assert fuyu("ask", d, "--fields", two, "-o", out, "-m", tiny_model, *FAST).code == 0
    asked = []
    real = Runner._generate_batch
    monkeypatch.setattr(Runner, "_generate_batch",
                        lambda self, items, gen: asked.extend(a.field.name for p in items for a in p.asks)
                        or real(self, items, gen))
    three = _fields_file(tmp_path, FIELDS[:3])
    r = fuyu("ask", d, "--fields", three, "-o", out, "-m", tiny_model, *FAST)
    assert r.code == 0, r.err
    assert asked == ["paid"] * 4
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = [(x["id"], name) for x in recs for name in x["answers"]]
    assert len(pairs) == len(set(pairs)) == 12
    asked.clear()
    assert fuyu("ask", d, "--fields", three, "-o", out, "-m", tiny_model, *FAST).code == 0 and asked == []
    # the same name with another question is another field: refused, not mixed in
    changed = _fields_file(tmp_path, [{**FIELDS[0], "question": "What is the tax?"}])
    r = fuyu("ask", d, "--fields", changed, "-o", out, "-m", tiny_model, *FAST)
    assert r.code == 2 and "asked differently" in r.err


def test_sigkill_then_rerun_leaves_every_item_and_field_once(tiny_model, tmp_path):
    d = write_mixed_folder(tmp_path / "docs")
    out = tmp_path / "fields.jsonl"
    fields = _fields_file(tmp_path, FIELDS[:2] + FIELDS[5:])
    cmd = fuyu_cmd("ask", d, "--fields", fields, "-m", tiny_model, "--dtype", "float32",
                   "--max-new-tokens", "24", "-b", "2", "-o", out)
    done = kill_after_lines(cmd, out, 2)
    assert 2 <= done < 11, done
    rerun = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = [(x["id"], name) for x in recs for name in x["answers"]]
    assert len(pairs) == len(set(pairs)) == 11 * 3


def test_fields_share_one_prefill_of_the_image(tiny_model, tmp_path, monkeypatch):
    from fuyu import model as engine

    calls = []
    real = engine.encode_prefix
    monkeypatch.setattr(engine, "encode_prefix", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    fields = _fields_file(tmp_path)
    r = fuyu("ask", png(tmp_path / "a.png", (90, 60)), "--fields", fields, "-m", tiny_model, *FAST)
    assert r.code == 0 and len(r.records()) == 1
    assert len(calls) == 1  # six fields, one image prefix


def test_python_api_and_fuyu_predictor_give_the_cli_rows(tiny_model, tmp_path):
    import numpy as np

    from fuyu.cluster import FuyuPredictor
    from fuyu.fields import Field, extract

    pdf = write_pdf(tmp_path / "inv.pdf", 2)
    image = png(tmp_path / "a.png", (60, 40))
    fields = _fields_file(tmp_path, FIELDS[:3])
    cli = {x["id"]: x for x in fuyu("ask", pdf, image, "--fields", fields, "-m", tiny_model, *FAST).records()}
    api = list(extract([str(pdf), str(image)], [Field(**f) if "choices" not in f else f for f in FIELDS[:3]],
                       model=str(tiny_model), device="cpu", dtype="float32", max_new_tokens=10))
    assert {r.id: r.answers for r in api} == {k: v["answers"] for k, v in cli.items()}
    predict = FuyuPredictor(model=str(tiny_model), task="fields", fields=FIELDS[:3], per_document=True,
                            max_new_tokens=10, dtype="float32", threads=1)
    rows = predict({"path": np.array([str(pdf), str(image), str(tmp_path / "missing.png")], dtype=object)}).to_pylist()
    assert [r["path"] for r in rows] == [str(pdf), str(image), str(tmp_path / "missing.png")]
    assert {"total", "total_score", "total_page", "count", "paid"} <= set(rows[0]) and rows[2]["error"]
    for name in ("total", "count", "paid"):
        page = rows[0][f"{name}_page"]
        assert rows[0][name] == cli[f"{pdf}#page={page}"]["answers"][name]


def test_a_pattern_the_grammar_library_cannot_take_is_one_line_and_exit_2(tiny_model, tmp_path):
    r = fuyu("ask", png(tmp_path / "a.png"), "--field", r"r:regex=Ref?", "--pattern", r"(?=a)b", "-m", tiny_model,
             *FAST)
    assert r.code == 2 and r.err.startswith("error: field 'r': cannot build a grammar") and r.out == "", r.err
    assert len(r.err.strip().splitlines()) == 1
