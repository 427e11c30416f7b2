"""Fuyu's tokenizer: encode prompt fragments, decode generated ids, special ids looked up by piece.

Encoding must equal the reference's tokenizer.json: a Unigram model whose
normalizer prepends "▁" and maps " " to "▁", with byte fallback. sentencepiece on tokenizer.model
does the same when its normalizer is identity with a dummy prefix; `from_dir` checks that and
otherwise builds the equivalent Unigram from the same pieces with the `tokenizers` library.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from fuyu.preprocess.errors import PreprocessError

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Round-trips only under the reference's normalisation: no whitespace collapsing, no NFKC.
_PROBE = " a  b\n\tc ﬁ Ａ "

# Roles the rest of the package needs, by piece (ids differ between vocabularies).
SPECIAL_PIECES = {
    "unk_id": "<unk>", "bos_id": "<s>", "eos_id": "|ENDOFTEXT|", "speaker_id": "|SPEAKER|",
    "newline_id": "|NEWLINE|", "box_open_id": "<0x00>", "box_close_id": "<0x01>",
    "point_open_id": "<0x02>", "point_close_id": "<0x03>", "boa_id": "<0x04>",
}


class Tokenizer:
    """encode(text) -> ids (each call starts with "▁"); decode(ids) -> text; named special ids."""

    pad_id = 0  # the reference pads with a literal 0 (= <unk>)

    def __init__(self, encode: Callable[[str], list[int]], pieces: list[str], source: str):
        self._encode = encode
        self.pieces = pieces
        self.source = source
        index = {p: i for i, p in enumerate(pieces)}
        missing = [p for p in [*SPECIAL_PIECES.values(), *map(str, range(1000))] if p not in index]
        if missing:
            raise PreprocessError(f"{source}: not a Fuyu vocabulary, pieces missing: {missing[:5]}")
        for name, piece in SPECIAL_PIECES.items():
            setattr(self, name, index[piece])
        self.number_ids = [index[str(n)] for n in range(1000)]  # coordinate n -> id of piece "n"
        self._number_of = {i: n for n, i in enumerate(self.number_ids)}
        self._skip = {self.unk_id, self.eos_id}  # the reference's only "special" ids (§3.1)

    @classmethod
    def from_dir(cls, ckpt_dir: str | Path) -> Tokenizer:
        """tokenizer.model via sentencepiece; tokenizer.json only when that is all there is."""
        d = Path(ckpt_dir)
        if (d / "tokenizer.model").is_file():
            return _from_sentencepiece(d / "tokenizer.model")
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
            pieces = [tok.id_to_token(i) or "" for i in range(tok.get_vocab_size(with_added_tokens=True))]
            return cls(lambda text: tok.encode(text, add_special_tokens=False).ids, pieces, str(d))
        where = "directory" if d.is_dir() else "path (no such directory)"
        raise PreprocessError(f"{d}: no tokenizer.model or tokenizer.json in this {where}; "
                              "point at a Fuyu checkpoint directory")

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` alone (no BOS/EOS), normalised as the reference: "▁" prepended, " " -> "▁"."""
        return self._encode(text)

    def number_id(self, n: int) -> int:
        return self.number_ids[n]

    def number_of(self, token_id: int) -> int | None:
        """The coordinate a "0"…"999" piece stands for, else None."""
        return self._number_of.get(int(token_id))

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each id writes into an answer ("▁" as a space, a byte piece as its byte), or
        None for the ids that are not text (<unk>, <s>, |ENDOFTEXT|, |SPEAKER|, |NEWLINE| and the
        box/point/answer markers <0x00>…<0x04>): what a grammar over answers may choose from."""
        special = {self.unk_id, self.bos_id, self.eos_id, self.speaker_id, self.newline_id, self.box_open_id,
                   self.box_close_id, self.point_open_id, self.point_close_id, self.boa_id}
        out: list[bytes | None] = []
        for i, piece in enumerate(self.pieces):
            m = _BYTE_PIECE.fullmatch(piece)
            data = bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8")
            out.append(None if i in special or not data else data)
        return out

    def decode(self, ids) -> str:
        """Like the reference's decode(skip_special_tokens=True): skip <unk> and |ENDOFTEXT| only,
        "▁" -> " ", byte pieces fused (invalid UTF-8 -> one U+FFFD per byte), strip one leading space."""
        out: list[str] = []
        pending = bytearray()
        for i in map(int, ids):
            if i in self._skip or not 0 <= i < len(self.pieces):
                continue  # out-of-vocab ids are dropped, as tokenizers does
            piece = self.pieces[i]
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                pending.append(int(m.group(1), 16))
                continue
            _flush(pending, out)
            out.append(piece.replace("▁", " "))
        _flush(pending, out)
        text = "".join(out)
        return text[1:] if text.startswith(" ") else text


def _flush(pending: bytearray, out: list[str]) -> None:
    if pending:
        try:
            out.append(pending.decode("utf-8"))
        except UnicodeDecodeError:
            out.append("\ufffd" * len(pending))
        pending.clear()


def _from_sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise PreprocessError(f"{path}: not a readable sentencepiece model ({e})") from None
    n = sp.get_piece_size()
    pieces = sp.id_to_piece(list(range(n)))
    tok = Tokenizer(lambda text: sp.encode(text), pieces, str(path))
    if tok.decode(sp.encode(_PROBE)) == _PROBE and pieces[sp.encode("x")[0]].startswith("▁"):
        return tok
    # The .model normalises differently from the reference's tokenizer.json: rebuild the latter's
    # Unigram from the same pieces and scores (what transformers' converter does).
    from tokenizers import Tokenizer as HFTokenizer, models, normalizers

    vocab = [(p, sp.get_score(i)) for i, p in enumerate(pieces)]
    hf = HFTokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return Tokenizer(lambda text: hf.encode(text, add_special_tokens=False).ids, pieces, str(path))
