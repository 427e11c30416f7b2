"""The tokenizer: loading rules, ids by piece, encode/decode behaviour the processor relies on."""

from __future__ import annotations

import shutil

import pytest

from fuyu.preprocess import FuyuProcessor, PreprocessError, Tokenizer
from fuyu.testing.tokenizer import special_ids, vocab_size

TEXTS = ["|SPEAKER|", "Generate a coco-style caption.\n", " ", "  a  b ", "x\n\ny", "in 2018 is 80.7.\n",
         "Héllo wörld ☃ 日本", "tab\there", "What color is the bus?\n", "ﬁ Ａ"]


def test_special_ids_are_looked_up_by_piece(tok, ckpt):
    ids = special_ids(ckpt)
    assert (tok.speaker_id, tok.newline_id, tok.eos_id, tok.bos_id, tok.boa_id) == (
        ids["speaker"], ids["newline"], ids["eos"], ids["bos"], ids["boa"])
    assert (tok.box_open_id, tok.box_close_id, tok.point_open_id, tok.point_close_id) == (
        ids["box_open"], ids["box_close"], ids["point_open"], ids["point_close"])
    assert tok.pad_id == 0 and tok.unk_id == 0
    assert tok.number_id(0) == ids["number_0"] and tok.number_id(999) == ids["number_0"] + 999
    assert tok.number_of(ids["number_0"] + 42) == 42 and tok.number_of(tok.eos_id) is None
    assert tok.vocab_size == vocab_size(ckpt)


def test_every_encode_starts_with_the_space_piece(tok, ckpt):
    space = special_ids(ckpt)["space"]
    assert tok.encode("|SPEAKER|") == [space, tok.speaker_id]
    assert tok.encode("|NEWLINE|") == [space, tok.newline_id]
    assert tok.encode("") == []


def test_sentencepiece_and_tokenizer_json_give_the_same_ids(ckpt, tmp_path):
    shutil.copy(ckpt / "tokenizer.json", tmp_path / "tokenizer.json")  # no tokenizer.model here
    sp, hf = Tokenizer.from_dir(ckpt), Tokenizer.from_dir(tmp_path)
    assert sp.source.endswith("tokenizer.model") and hf.pieces == sp.pieces
    for text in TEXTS:
        assert sp.encode(text) == hf.encode(text), text


def test_a_model_that_collapses_whitespace_still_encodes_like_tokenizer_json(ckpt, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((ckpt / "tokenizer.model").read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = True
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    only_json = tmp_path / "json"
    only_json.mkdir()
    shutil.copy(ckpt / "tokenizer.json", only_json / "tokenizer.json")
    odd, ref = Tokenizer.from_dir(tmp_path), Tokenizer.from_dir(only_json)
    for text in TEXTS:
        assert odd.encode(text) == ref.encode(text), text


def test_decode_skips_only_unk_and_endoftext(tok):
    keep = [tok.bos_id, tok.speaker_id, tok.boa_id]
    text = tok.decode([tok.unk_id, tok.eos_id, *keep])
    assert text == "<s>|SPEAKER|\x04"


def test_decode_renders_box_tokens_like_the_reference(tok):
    ids = [tok.box_open_id, *map(tok.number_id, (194, 213, 202, 244)), tok.box_close_id, tok.eos_id]
    assert tok.decode(ids) == "\x00194213202244\x01"


def test_decode_fuses_bytes_strips_one_leading_space_and_drops_unknown_ids(tok):
    assert tok.decode(tok.encode("  Héllo ☃\n")) == "  Héllo ☃\n"  # the prefix "▁" is the stripped space
    space = tok.encode(" ")[0]
    assert tok.decode([space, space, space]) == "  "
    byte = {b: tok.pieces.index(f"<0x{b:02X}>") for b in (0xC3, 0xE2)}
    assert tok.decode([byte[0xC3], *tok.encode("x")]) == "\ufffd x"  # a lone lead byte: one U+FFFD
    assert tok.decode([10**9, -1, *tok.encode("ok")]) == "ok"


def test_roundtrip_of_ordinary_text(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_missing_tokenizer_names_the_directory(tmp_path):
    with pytest.raises(PreprocessError, match=f"{tmp_path}: no tokenizer.model or tokenizer.json"):
        FuyuProcessor.from_pretrained(tmp_path)
    with pytest.raises(PreprocessError, match="no such directory"):
        FuyuProcessor.from_pretrained(tmp_path / "absent")


def test_corrupt_model_file_is_a_preprocess_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(PreprocessError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


def test_a_vocabulary_without_fuyu_pieces_is_refused(tmp_path):
    import sentencepiece as spm

    with open(tmp_path / "tokenizer.model", "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 20), model_writer=f,
                                       vocab_size=30, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(PreprocessError, match="not a Fuyu vocabulary"):
        Tokenizer.from_dir(tmp_path)
