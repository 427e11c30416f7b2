"""Constrained decoding: a regular expression over answer bytes, compiled against the model's
vocabulary, restricting each decode step to the tokens that keep the answer matchable.

outlines-core compiles a regex and the vocabulary into a token-level automaton once (the allowed
ids of every state are known up front), so a step costs a dictionary lookup per row, and the
row is sampled among its allowed logits only (fuyu.model.generate.sample_allowed), whatever the
vocabulary size. Everything else is masked off, over all of the model's logits (262,144 for
Fuyu-8B): ids the tokenizer does not define, and ids that are not text (see
`Tokenizer.token_bytes`), are never allowed. |ENDOFTEXT| is allowed exactly where the regex can
end, so an answer that stops is a full match.
"""

from __future__ import annotations

import torch


class GrammarError(ValueError):
    """A pattern the automaton cannot be built from (bad syntax, or nothing in the vocabulary spells it)."""


class Vocabulary:
    """The answer bytes of every id (None: never allowed) and the EOS id; compiles regexes, each once."""

    def __init__(self, token_bytes: list[bytes | None], eos_id: int, n_logits: int):
        self.token_bytes, self.eos_id, self.n_logits = token_bytes, eos_id, n_logits
        self._vocabulary = None
        self._grammars: dict[str, Grammar] = {}

    def _outlines(self):
        if self._vocabulary is None:
            from outlines_core import Vocabulary as OutlinesVocabulary

            spelled: dict[bytes, list[int]] = {}
            for i, data in enumerate(self.token_bytes[:self.n_logits]):
                if data is not None and i != self.eos_id:
                    spelled.setdefault(data, []).append(i)
            self._vocabulary = OutlinesVocabulary(self.eos_id, spelled)
        return self._vocabulary

    def grammar(self, regex: str) -> Grammar:
        if regex not in self._grammars:
            from outlines_core import Index

            try:
                index = Index(regex, self._outlines())
            except (ValueError, RuntimeError) as e:
                raise GrammarError(f"cannot build a grammar from {regex!r}: {' '.join(str(e).split())}") from None
            self._grammars[regex] = Grammar(index, self.eos_id)
        return self._grammars[regex]


class Grammar:
    """One compiled regex: states are ints; the allowed ids of each state are cached as a tensor."""

    def __init__(self, index, eos_id: int):
        self.index, self.eos_id = index, eos_id
        self.initial = index.get_initial_state()
        self._allowed: dict[tuple[int, torch.device], torch.Tensor] = {}

    def allowed(self, state: int, device: torch.device) -> torch.Tensor:
        key = (state, device)
        if key not in self._allowed:
            ids = self.index.get_allowed_tokens(state) or [self.eos_id]  # a dead end can only stop
            self._allowed[key] = torch.tensor(sorted(ids), dtype=torch.long, device=device)
        return self._allowed[key]

    def advance(self, state: int, token: int) -> int | None:
        """The state after `token`; None after EOS (or a token the state does not allow)."""
        if token == self.eos_id:
            return None
        return self.index.get_next_state(state, token)


class Constraints:
    """The grammar state of each row of one generate call (rows without a grammar are free)."""

    def __init__(self, grammars: list[Grammar | None]):
        self.grammars = grammars
        self.states = [None if g is None else g.initial for g in grammars]

    def allowed(self, device: torch.device) -> list[torch.Tensor | None]:
        """Per row, the ids its grammar allows next; None for a row without one (or whose grammar
        has ended): any id."""
        return [None if g is None or s is None else g.allowed(s, device) for g, s in zip(self.grammars, self.states)]

    def advance(self, ids: torch.Tensor) -> None:
        """Move each constrained row on by the id it chose (one host read of `ids`)."""
        if all(s is None for s in self.states):
            return
        for row, token in enumerate(ids.tolist()):
            grammar, state = self.grammars[row], self.states[row]
            if grammar is not None and state is not None:
                self.states[row] = grammar.advance(state, token)
