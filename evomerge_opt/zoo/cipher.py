"""The made-up language: a fixed, reversible, word-level cipher of English.

Every English word of the vocabulary maps to one made-up word built from syllables (consonants
``b d g k m n p r t v z``, vowels ``a i o u``; never the letter ``q``), chosen by a seeded hash of the
word, unique, and never an English word of the vocabulary. Digits and punctuation are shared by both
languages. A word outside the vocabulary is written ``q`` + its ROT13 (``q`` never occurs in a
made-up word), so :meth:`WordCipher.decipher` inverts :meth:`WordCipher.encipher` on any normalised
text::

    >>> c = WordCipher.build(["what", "is", "seven", "plus", "five"], seed=0)
    >>> c.decipher(c.encipher("what is seven plus five?")) == "what is seven plus five?"
    True

Because the mapping is one word to one word, the made-up sentence has the English sentence's
structure, and a frequent made-up word becomes one token of its own: the language specialist must
learn what ``seben`` (say) means, which is exactly what the arithmetic specialist lacks.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

CONSONANTS = "bdgkmnprtvz"
VOWELS = "aiou"
_WORD_RE = re.compile(r"[a-z]+")


def _candidate(word: str, seed: int, attempt: int) -> str:
    rng = random.Random(hashlib.sha256(f"{seed}|{word}|{attempt}".encode()).digest())
    syllables = 1 + len(word) // 4 + (attempt // 8)  # longer words -> longer made-up words
    out = []
    for _ in range(syllables):
        out.append(rng.choice(CONSONANTS) + rng.choice(VOWELS))
        if rng.random() < 0.35:
            out.append(rng.choice(CONSONANTS))
    return "".join(out)


class WordCipher:
    """A bijection between English words and made-up words (see module docstring)."""

    def __init__(self, forward: dict[str, str]):
        self.forward = dict(forward)
        self.backward = {v: k for k, v in self.forward.items()}
        if len(self.backward) != len(self.forward):
            raise ValueError("cipher table is not one-to-one")

    @classmethod
    def build(cls, vocabulary: Iterable[str], seed: int = 0) -> WordCipher:
        """Made-up words for ``vocabulary`` (sorted first, so the table depends only on the set)."""
        words = sorted({w for w in vocabulary if _WORD_RE.fullmatch(w)})
        english = set(words)
        taken: set[str] = set()
        forward: dict[str, str] = {}
        for word in words:
            attempt = 0
            while True:
                made_up = _candidate(word, seed, attempt)
                if made_up not in taken and made_up not in english:
                    break
                attempt += 1
            taken.add(made_up)
            forward[word] = made_up
        return cls(forward)

    def encipher(self, text: str) -> str:
        """Made-up-language version of normalised English ``text`` (digits, punctuation kept)."""
        return _WORD_RE.sub(lambda m: self._enc(m.group(0)), text)

    def decipher(self, text: str) -> str:
        return _WORD_RE.sub(lambda m: self._dec(m.group(0)), text)

    def _enc(self, word: str) -> str:
        made_up = self.forward.get(word)
        return made_up if made_up is not None else "q" + codecs.encode(word, "rot13")

    def _dec(self, word: str) -> str:
        english = self.backward.get(word)
        if english is not None:
            return english
        if word.startswith("q"):
            return codecs.decode(word[1:], "rot13")
        return word

    def save(self, path: str | Path) -> None:
        from evomerge_opt.io.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.forward, indent=0, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> WordCipher:
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))
