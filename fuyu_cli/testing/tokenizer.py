"""A tiny Fuyu-shaped tokenizer, built in-process for tests (no hub, no binary fixtures).

`write_tokenizer(dir)` writes tokenizer.model (sentencepiece), tokenizer.json (HF tokenizers, the
real file's structure: a Unigram model with byte fallback), tokenizer_config.json, special_tokens_map.json and
preprocessor_config.json. Ids differ from the real 262144-piece vocab; everything that matters
("▁", "|SPEAKER|", "|NEWLINE|", "|ENDOFTEXT|", "<s>", "<0x00>"…"<0x04>", "0"…"999") exists as a
piece, so code that looks ids up by piece works on both.

Both files hold exactly the same (piece, score) list, so sentencepiece and HF's Unigram agree.
"""

from __future__ import annotations

import functools
import io
import json
import random
from pathlib import Path

SPECIAL_PIECES = {
    "unk": "<unk>",
    "bos": "<s>",  # the processor's BOS (not the HF tokenizer's bos_token, which is |ENDOFTEXT|)
    "eos": "|ENDOFTEXT|",
    "speaker": "|SPEAKER|",
    "newline": "|NEWLINE|",
    "box_open": "<0x00>",
    "box_close": "<0x01>",
    "point_open": "<0x02>",
    "point_close": "<0x03>",
    "boa": "<0x04>",
    "space": "▁",
}

# English + UI/document words. No digits (the numbers "0"…"999" are added as whole pieces, as in
# the real vocab) and no "|" (so "▁|SPEAKER|" always splits into "▁" + "|SPEAKER|").
_CORPUS = """\
A blue bus parked on the side of a road.
The bus is blue. What color is the bus? Generate a coco-style caption.
When presented with a box, perform OCR to extract text contained within it.
If provided with text, generate the corresponding bounding box.
What is the highest life expectancy at birth of males in the chart?
Click the Submit button to save your settings. Cancel, Apply, Open File, Save As, Close Window.
Search results for the query. Sign in with your email address and password. Forgot password?
The quick brown fox jumps over the lazy dog. Hello world, this is a small test document.
Menu, Edit, View, Help, Tools, Options, Preferences, Account, Profile, Logout, Home, Settings.
Invoice total amount due. Table of contents. Chapter one: introduction and overview.
A person riding a skateboard down the street next to a building with windows.
Two cats sleeping on a red couch near a lamp. A man holding an umbrella in the rain.
Look at the point now. Williams street, main avenue, north station, river park.
Download the report and share it with your team. Notifications are turned off.
"""


@functools.lru_cache(maxsize=1)
def _build() -> dict[str, bytes]:
    """Train once per process; return {file name: bytes}."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    lines = [line for line in _CORPUS.splitlines() if line] * 8
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="unigram", vocab_size=600,
        hard_vocab_limit=False, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, character_coverage=1.0,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    have = {p.piece for p in proto.pieces}
    extra = [("|SPEAKER|", 0.0), ("|NEWLINE|", 0.0), ("|ENDOFTEXT|", 0.0)]
    if "▁" not in have:
        extra.append(("▁", -3.0))
    # Distinct negative scores so Viterbi never meets a tie (sentencepiece and HF could break it
    # differently).
    rng = random.Random(0)
    extra += [(str(n), -(8.0 + rng.random())) for n in range(1000)]
    for piece, score in extra:
        assert piece not in have, piece
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, score, pb.ModelProto.SentencePiece.NORMAL
    model_bytes = proto.SerializeToString()
    # Read the scores back as stored (float32), so tokenizer.json carries the identical values.
    proto.ParseFromString(model_bytes)
    vocab = [(p.piece, float(p.score)) for p in proto.pieces]
    return {
        "tokenizer.model": model_bytes,
        "tokenizer.json": _tokenizer_json(vocab),
        "tokenizer_config.json": _json(_TOKENIZER_CONFIG),
        "special_tokens_map.json": _json(_SPECIAL_TOKENS_MAP),
        "preprocessor_config.json": _json(_PREPROCESSOR_CONFIG),
    }


def _tokenizer_json(vocab: list[tuple[str, float]]) -> bytes:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    eot = ("|ENDOFTEXT|", ids["|ENDOFTEXT|"])
    tok.post_processor = processors.TemplateProcessing(
        single="|ENDOFTEXT| $A", pair="|ENDOFTEXT| $A |ENDOFTEXT| $B:1", special_tokens=[eot],
    )
    tok.add_special_tokens([
        AddedToken("<unk>", special=True, normalized=False),
        AddedToken("|ENDOFTEXT|", special=True, normalized=False),
    ])
    return tok.to_str(pretty=False).encode()


def _json(obj) -> bytes:
    return json.dumps(obj, indent=2).encode()


_TOKENIZER_CONFIG = {  # as the current hub tokenizer_config.json
    "tokenizer_class": "LlamaTokenizer",
    "legacy": True,
    "bos_token": "|ENDOFTEXT|",
    "eos_token": "|ENDOFTEXT|",
    "unk_token": "<unk>",
    "pad_token": None,
    "additional_special_tokens": ["<unk>", "|ENDOFTEXT|"],
    "clean_up_tokenization_spaces": False,
    "spaces_between_special_tokens": False,
    "processor_class": "FuyuProcessor",
    "model_max_length": 1000000000000000019884624838656,
}
_SPECIAL_TOKENS_MAP = {
    "bos_token": "|ENDOFTEXT|",
    "eos_token": "|ENDOFTEXT|",
    "unk_token": "<unk>",
    "additional_special_tokens": ["<unk>", "|ENDOFTEXT|"],
}
_PREPROCESSOR_CONFIG = {  # as the hub preprocessor_config.json
    "image_processor_type": "FuyuImageProcessor",
    "padding_mode": "constant",
    "padding_value": 1.0,
    "processor_class": "FuyuProcessor",
    "target_height": 1080,
    "target_width": 1920,
}


def write_tokenizer(dir: Path) -> None:
    """Write the tiny tokenizer files into `dir` (created if missing)."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    for name, data in _build().items():
        (dir / name).write_bytes(data)


def _pieces(dir: Path | None) -> list[str]:
    raw = (Path(dir) / "tokenizer.json").read_bytes() if dir is not None else _build()["tokenizer.json"]
    return [piece for piece, _ in json.loads(raw)["model"]["vocab"]]


def vocab_size(dir: Path | None = None) -> int:
    """Number of pieces (size the model's embedding and lm_head with this)."""
    return len(_pieces(dir))


def special_ids(dir: Path | None = None) -> dict[str, int]:
    """{"speaker", "newline", "eos", "bos", "boa", "box_open", ..., "pad", "unk", "space", "number_0"}."""
    index = {piece: i for i, piece in enumerate(_pieces(dir))}
    ids = {name: index[piece] for name, piece in SPECIAL_PIECES.items()}
    ids["pad"] = 0  # the processor pads with id 0 (= <unk>), as the reference does
    ids["number_0"] = index["0"]  # "0"…"999" are contiguous: id("n") = number_0 + n
    return ids
