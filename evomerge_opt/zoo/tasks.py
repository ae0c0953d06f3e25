"""The zoo's four tasks and their splits: English, arithmetic in English, the made-up language, and
arithmetic posed in the made-up language (the target: neither specialist saw it).

Records are dicts with a ``text`` field; question-answer records (``math_en``, ``math_lang``) also have
``prompt`` (ends with "the answer is" or its made-up form) and ``answer`` (digits, shared by both
languages), so answer accuracy can be scored: ``text == prompt + " " + answer + "."``.

Splits are by a hash of the item (a module path for docstrings, the question for arithmetic), so
``dev``/``test`` are held out from every ``train`` set. ``math_lang`` dev/test are exactly the made-up
forms of the held-out ``math_en`` dev/test questions: the arithmetic model has seen neither the
question nor its language, the language model has seen no arithmetic at all.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field

from evomerge_opt.zoo.cipher import WordCipher
from evomerge_opt.zoo.corpus import NUMBER_WORDS, iter_docstrings, number_sentences, split_of

logger = logging.getLogger(__name__)

TASKS = ("english", "math_en", "lang", "math_lang")
TARGET_TASK = "math_lang"

# "{a}" / "{b}" are number words; every prompt ends with the same answer cue.
PLUS_TEMPLATES = (
    "what is {a} plus {b}? the answer is",
    "how much is {a} plus {b}? the answer is",
    "add {a} and {b}. the answer is",
    "tell me the sum of {a} and {b}. the answer is",
    "if you have {a} and get {b} more, how many do you have? the answer is",
)
MINUS_TEMPLATES = (
    "what is {a} minus {b}? the answer is",
    "how much is {a} minus {b}? the answer is",
    "take {b} from {a}. the answer is",
    "if you have {a} and lose {b}, how many are left? the answer is",
)


@dataclass
class ZooData:
    """Records per task and split, and the cipher that made the made-up language."""

    cipher: WordCipher
    splits: dict[str, dict[str, list[dict[str, str]]]] = field(default_factory=dict)

    def texts(self, task: str, split: str) -> list[str]:
        return [r["text"] for r in self.splits[task].get(split, [])]


def arithmetic_items(max_operand: int) -> list[dict[str, str]]:
    """Every (template, a, b) question with operands 0..max_operand (minus: a >= b), in fixed order."""
    items = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            for template in PLUS_TEMPLATES:
                items.append(_qa(template, a, b, a + b))
            if a >= b:
                for template in MINUS_TEMPLATES:
                    items.append(_qa(template, a, b, a - b))
    return items


def _qa(template: str, a: int, b: int, answer: int) -> dict[str, str]:
    prompt = template.format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b])
    return {"prompt": prompt, "answer": str(answer), "text": f"{prompt} {answer}."}


def _cap(records: list[dict[str, str]], limit: int | None, seed: int) -> list[dict[str, str]]:
    if limit is None or len(records) <= limit:
        return records
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(records)), limit))
    return [records[i] for i in picked]


def _truncate_words(text: str, max_words: int) -> str:
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words])


def build_data(
    *,
    seed: int,
    max_paragraphs: int,
    max_words: int,
    num_number_sentences: int,
    max_operand: int,
    eval_size: int,
    eval_size_text: int,
    dev_fraction: float = 0.08,
    test_fraction: float = 0.08,
) -> ZooData:
    """All tasks' records. ``eval_size``/``eval_size_text`` cap each dev/test set (QA / text tasks)."""
    # English: docstring paragraphs (split by module) + number sentences (split by sentence).
    english: dict[str, list[dict[str, str]]] = {"train": [], "dev": [], "test": []}
    for count, (module, para) in enumerate(iter_docstrings(), start=1):
        split = split_of(module, dev_fraction, test_fraction, salt=f"doc{seed}")
        english[split].append({"text": _truncate_words(para, max_words)})
        if count >= max_paragraphs:
            break
    for i, sentence in enumerate(number_sentences(seed, num_number_sentences)):
        split = split_of(f"{i}|{sentence}", dev_fraction, test_fraction, salt=f"num{seed}")
        english[split].append({"text": sentence})

    math_en: dict[str, list[dict[str, str]]] = {"train": [], "dev": [], "test": []}
    for item in arithmetic_items(max_operand):
        math_en[split_of(item["prompt"], dev_fraction * 2, test_fraction * 2, salt=f"math{seed}")].append(item)

    vocab = Counter()
    for split in english.values():
        for record in split:
            vocab.update(w for w in record["text"].split() if w.isalpha())
    for item in arithmetic_items(max_operand):
        vocab.update(w.strip("?.,") for w in item["prompt"].split())
    cipher = WordCipher.build(vocab, seed=seed)

    lang = {split: [{"text": cipher.encipher(r["text"])} for r in records] for split, records in english.items()}
    math_lang: dict[str, list[dict[str, str]]] = {}
    for split in ("dev", "test"):
        math_lang[split] = []
        for item in math_en[split]:
            prompt = cipher.encipher(item["prompt"])
            math_lang[split].append({"prompt": prompt, "answer": item["answer"], "text": f"{prompt} {item['answer']}."})

    data = ZooData(cipher=cipher)
    for task, splits in (("english", english), ("math_en", math_en), ("lang", lang), ("math_lang", math_lang)):
        limit = eval_size if task.startswith("math") else eval_size_text
        data.splits[task] = {
            name: (_cap(records, limit, seed + 17 * i) if name != "train" else records)
            for i, (name, records) in enumerate(sorted(splits.items()))
        }
    # math_lang must stay the made-up form of the same math_en questions after capping.
    data.splits["math_lang"] = {
        split: [
            {"prompt": cipher.encipher(r["prompt"]), "answer": r["answer"],
             "text": f"{cipher.encipher(r['prompt'])} {r['answer']}."}
            for r in data.splits["math_en"][split]
        ]
        for split in ("dev", "test")
    }
    for task in TASKS:
        logger.info("task %s: %s", task, {s: len(r) for s, r in data.splits[task].items()})
    return data
