"""English text that every Python installation has: the standard library's docstrings, read with ``ast``.

Nothing is downloaded and nothing is imported: each ``*.py`` file of the standard library is parsed
(never executed) and the docstrings of its module, classes and functions are collected in a fixed
order (sorted relative paths, then source order), so the corpus is the same on every run of the
same Python version. Text is normalised to lower-case words, digits and a little punctuation, which
keeps the vocabulary small and makes the word-level cipher (:mod:`evomerge_opt.zoo.cipher`) total.

Besides docstrings, :func:`number_sentences` writes plain English sentences about the numbers zero
to twenty ("seven comes after six.", "there are seven cats in the box."): they give the number words
a meaning in the base model that is *not* arithmetic, so the made-up language's number words can be
learned by the language specialist from the same kind of sentences.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import random
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# Words, single digits and a few punctuation marks; everything else is dropped by ``normalize``.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip", "__pycache__"}

NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
]


def normalize(text: str) -> str:
    """Lower-case ``text`` and keep only words, digits and simple punctuation, space-separated.

    Numbers stay ``42`` (the tokenizer splits digits). Returns ``""`` when nothing is left.
    """
    words = re.findall(r"[a-z]+|[0-9]+|[.,;:?!()=+\-*/]", text.lower())
    out = " ".join(words)
    # No space before closing punctuation, so the text reads like English.
    return re.sub(r" ([.,;:?!)])", r"\1", out).replace("( ", "(")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _iter_source_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).parts
        if any(part in _SKIP_DIRS or part.startswith("test") for part in rel[:-1]):
            continue
        if rel[-1].startswith("test_"):
            continue
        yield path


def iter_docstrings(root: Path | None = None, min_words: int = 8) -> Iterator[tuple[str, str]]:
    """Yield ``(module_path, paragraph)`` for every docstring paragraph of at least ``min_words`` words.

    Paragraphs (blank-line separated) are the unit: they are short, self-contained English, and a
    module's paragraphs all go to the same split (see :func:`split_of`).
    """
    root = root or stdlib_root()
    for path in _iter_source_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old escape sequences in some stdlib files
                tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                if ">>>" in para or "::" in para:  # doctest / code blocks are not English
                    continue
                text = normalize(para)
                if len(text.split()) >= min_words:
                    yield rel, text


def split_of(key: str, dev_fraction: float, test_fraction: float, salt: str = "") -> str:
    """Deterministic ``train``/``dev``/``test`` assignment of ``key`` by a hash (stable across runs)."""
    h = int.from_bytes(hashlib.sha256(f"{salt}|{key}".encode()).digest()[:8], "big") / 2**64
    if h < dev_fraction:
        return "dev"
    if h < dev_fraction + test_fraction:
        return "test"
    return "train"


def number_sentences(seed: int, count: int) -> list[str]:
    """``count`` English sentences about the numbers zero..twenty that are not arithmetic.

    They tie each number word to its neighbours, its size and its digit ("seven is written 7."),
    which is what lets a model map a *made-up* number word onto the same meaning later.
    """
    rng = random.Random(seed)
    things = ["cats", "books", "files", "apples", "stones", "lines", "birds", "keys", "boxes", "trees"]
    places = ["box", "room", "list", "garden", "table", "folder", "bag", "house"]
    words = NUMBER_WORDS
    out: list[str] = []
    for _ in range(count):
        kind = rng.randrange(9)
        n = rng.randrange(1, len(words))
        if kind == 0:
            out.append(f"{words[n]} comes after {words[n - 1]}.")
        elif kind == 1:
            out.append(f"there are {words[n]} {rng.choice(things)} in the {rng.choice(places)}.")
        elif kind == 2:
            a, b = rng.sample(range(len(words)), 2)
            a, b = max(a, b), min(a, b)
            out.append(f"{words[a]} is more than {words[b]}, and {words[b]} is less than {words[a]}.")
        elif kind == 3:
            out.append(f"the number {words[n]} is written {n}.")
        elif kind == 4:
            start = rng.randrange(0, len(words) - 4)
            out.append("we count " + ", ".join(words[start : start + 4 + rng.randrange(0, 3)][:5]) + ".")
        elif kind == 5:
            out.append(f"{words[n - 1]} comes before {words[n]}.")
        elif kind == 6:
            out.append(f"what comes after {words[n - 1]}? the answer is {words[n]}.")
        elif kind == 7:
            out.append(f"how many {rng.choice(things)} are in the {rng.choice(places)}? the answer is {words[n]}.")
        else:
            out.append(rng.choice(_TASK_WORD_SENTENCES))
    return out


# Plain (non-arithmetic) uses of the words the arithmetic questions are made of, so that the language
# specialist meets their made-up forms too.
_TASK_WORD_SENTENCES = (
    "the plus sign is written +, and the minus sign is written -.",
    "add the new keys to the list, then take the old keys from it.",
    "tell me the name of the file, and i will tell you how much is left.",
    "if you lose the key, you get a new one.",
    "the sum of the sizes is returned; how much is used is returned too.",
    "what is the answer? tell me, and i will add it to the list.",
    "take one more book from the box if you have room.",
    "how much is left in the bag? we have more than we need.",
    "if you have the key, you can take the book and add a new line.",
)
