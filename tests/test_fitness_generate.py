"""`metric: generate`: greedy generation + extraction on a scripted model whose output is known, and the
batched cached generation against Hugging Face `generate` on real tiny models (PS, DFS, PS+DFS)."""

from __future__ import annotations

import logging

import pytest
import torch
from _fitness_helpers import TINY_PROMPTS, ScriptedLM, digit_tokenizer, write_jsonl

from evomerge_opt.fitness.evaluator import FitnessEvaluator
from evomerge_opt.fitness.extract import last_number, make_extractor, to_number
from evomerge_opt.fitness.forward import encode
from evomerge_opt.fitness.generation import generate_batch, greedy_generate, hf_generate

# (prompt, what the scripted model writes, reference answer, right?, extractable?) under last_number.
SCRIPTED = [
    ("q one", " the answer is 42.", "42", True, True),
    ("q two", " i think it is 7 or 8", "8", True, True),  # the LAST number counts
    ("q three", " i think it is 7 or 8", "7", False, True),
    ("q four", " no idea at all", "3", False, False),
    ("q five", " it costs 1,000 dollars", "1000", True, True),  # thousands separator, numeric compare
    ("q six", " total: -3", "-3", True, True),
    ("q seven", " the result is 12\nand then 99", "12", True, True),  # cut at the stop string "\n"
    ("q eight", " the result is 12\nand then 99", "99", False, True),
]


@pytest.fixture(scope="module")
def digit_tok():
    return digit_tokenizer()


def _scripted(tok, rows):
    scripts = {}
    for prompt, text, *_ in rows:
        # The zoo tokenizer prepends a space to every text it encodes (and decodes it back).
        ids = tok(text.removeprefix(" "), add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        scripts[tuple(encode(tok, prompt, False))] = list(ids)
    return ScriptedLM(scripts, len(tok), tok.eos_token_id)


def test_extractors_and_numbers():
    assert last_number("7 or 8") == "8"
    assert last_number("it costs 1,000 dollars") == "1,000"
    assert last_number("5-3 is 2") == "2" and last_number("x -3") == "-3" and last_number("5-3") == "3"
    assert last_number("pi is 3.14.") == "3.14"
    assert last_number("no digits") is None
    assert make_extractor("first_line")("\n\n  paris \nrome") == "paris"
    assert make_extractor(r"regex:answer: (\w+)")("the answer: rome.") == "rome"
    assert make_extractor(r"regex:answer: (\w+)")("nothing") is None
    assert to_number("$1,000.") == 1000.0 and to_number("abc") is None


def test_generate_last_number_on_known_answers(tmp_path, digit_tok):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": p, "answer": a} for p, _, a, *_ in SCRIPTED])
    model = _scripted(digit_tok, SCRIPTED)
    spec = {"name": "gen", "path": str(data), "metric": "generate", "max_new_tokens": 16, "stop": ["\n"]}
    evaluator = FitnessEvaluator.from_specs([spec], digit_tok, batch_size=3)
    result = evaluator.evaluate(model, record_items=True)
    score = result.per_dataset["gen"]
    assert result.item_scores["gen"] == [float(r[3]) for r in SCRIPTED]
    assert score.value == sum(r[3] for r in SCRIPTED) / len(SCRIPTED)
    assert score.extracted == sum(r[4] for r in SCRIPTED) / len(SCRIPTED)
    assert score.n == len(SCRIPTED) and evaluator.objective_names == ["accuracy"]
    assert evaluator.directions == ["maximize"]
    metric = evaluator.datasets[0]
    assert metric.last_texts[6] == " the result is 12"  # cut at the stop string
    # Without the stop string the last number of the whole text is taken.
    spec_nostop = {**spec, "stop": []}
    again = FitnessEvaluator.from_specs([spec_nostop], digit_tok, batch_size=3).evaluate(model, record_items=True)
    assert again.item_scores["gen"][6:] == [0.0, 1.0]


def test_generate_regex_exact_compare_and_normalisation(tmp_path, digit_tok):
    rows = [("q a", " answer: paris", "Paris", True, True), ("q b", " The Answer Is Yes", "yes", False, False)]
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": p, "gold": a} for p, _, a, *_ in rows])
    model = _scripted(digit_tok, rows)
    base = {"path": str(data), "metric": "generate", "prompt_field": "question", "answer_field": "gold",
            "extract": r"regex:answer: (\w+)", "compare": "exact"}
    exact = FitnessEvaluator.from_specs([{**base, "name": "a"}], digit_tok).evaluate(model, record_items=True)
    assert exact.item_scores["a"] == [0.0, 0.0]  # "paris" != "Paris" without case-folding
    folded = FitnessEvaluator.from_specs([{**base, "name": "b", "normalize": ["strip", "casefold"]}],
                                         digit_tok).evaluate(model, record_items=True)
    assert folded.item_scores["b"] == [1.0, 0.0]
    assert folded.per_dataset["b"].extracted == 0.5  # the regex finds no "answer: " in the second text


def test_zero_extraction_is_a_warning_not_a_silent_zero(tmp_path, digit_tok, caplog):
    rows = [("q x", " no idea at all", "1", False, False), ("q y", " no idea at all", "2", False, False)]
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": p, "answer": a} for p, _, a, *_ in rows])
    evaluator = FitnessEvaluator.from_specs([{"name": "none", "path": str(data), "metric": "generate"}], digit_tok)
    with caplog.at_level(logging.WARNING, logger="evomerge_opt.fitness.evaluator"):
        result = evaluator.evaluate(_scripted(digit_tok, rows))
    score = result.per_dataset["none"]
    assert score.value == 0.0 and score.extracted == 0.0
    assert score.warning and "no answer could be extracted" in score.warning
    assert score.to_attrs()["warning"] == score.warning  # goes to the trial's per_dataset attrs
    assert result.warnings == [score.warning]
    assert any("no answer could be extracted" in r.message for r in caplog.records)


def test_rows_leave_the_batch_when_they_finish(digit_tok):
    rows = [("q one", " the answer is 42.", "", 0, 0), ("q two", " i think it is 7 or 8", "", 0, 0)]
    model = _scripted(digit_tok, rows)
    prompts = [encode(digit_tok, p, False) for p, *_ in rows]
    out = generate_batch(model, digit_tok, prompts, max_new_tokens=40, stop=["42"])
    assert out.texts[0] == " the answer is " and out.texts[1] == " i think it is 7 or 8"
    assert out.steps == len(out.tokens[1]) + 1  # ended at the last row's EOS, not at max_new_tokens
    assert model.calls == out.steps  # one prefill + one forward per further step
    assert len(out.tokens[0]) < len(out.tokens[1])
    uncached = generate_batch(model, digit_tok, prompts, max_new_tokens=40, stop=["42"], use_cache=False)
    assert uncached.tokens == out.tokens


# ---------------------------------------------------------------------------------- real tiny models


def _load(path):
    from evomerge_opt.pool import load_causal_lm

    return load_causal_lm(str(path), dtype="float32")


@pytest.fixture(scope="module")
def llama_sources(tiny_llama_family):
    return [_load(tiny_llama_family[k]) for k in ("base", "ft0", "ft1")]


def _dfs_recipe(num_models: int = 2):
    mask = [[[True, True], [False, True]], [[True, False], [True, True]]]
    scales = [[[1.0, 0.9], [None, 1.1]], [[0.8, None], [1.0, 1.2]]]
    return {"model_paths": [f"m{i}" for i in range(num_models)], "num_r": 2, "layer_mask": mask,
            "scaling_factors": scales, "input_layer_model": 0, "output_layer_model": 1}


@pytest.fixture(scope="module")
def candidates(tiny_llama_family, llama_sources):
    """A PS merge (resident), a DFS candidate over two sources, and PS+DFS (the PS merge routed with ft1)."""
    from evomerge_opt.api import merge_recipe as merge
    from evomerge_opt.dfs.build import build_dfs_candidate

    fam = tiny_llama_family
    ps = merge({"merge_method": "ties", "base_model": str(fam["base"]), "dtype": "float32",
                "models": [{"model": str(fam["ft0"]), "parameters": {"density": 0.5, "weight": 0.7}},
                           {"model": str(fam["ft1"]), "parameters": {"density": 0.5, "weight": 0.5}}]})
    dfs = build_dfs_candidate([llama_sources[1], llama_sources[2]], _dfs_recipe())
    ps_dfs = build_dfs_candidate([ps, llama_sources[2]], _dfs_recipe())
    return {"ps": ps, "dfs": dfs, "ps+dfs": ps_dfs}


@pytest.mark.parametrize("kind", ["ps", "dfs", "ps+dfs"])
def test_generate_metric_matches_hf_generate(kind, candidates, tiny_tokenizer, tmp_path):
    """Answers = the first line of what `model.generate` writes (one prompt at a time), for half of the
    prompts; the other half get a wrong answer. Our batched cached generation must score exactly that."""
    model = candidates[kind]
    tok = tiny_tokenizer
    prompts = [encode(tok, p, False) for p in TINY_PROMPTS]
    reference = hf_generate(model, tok, prompts, max_new_tokens=6, batch_size=1)
    extract = make_extractor("first_line")
    records, expected = [], []
    for i, (prompt, text) in enumerate(zip(TINY_PROMPTS, reference.texts)):
        line = extract(text)
        right = i % 2 == 0 and line is not None
        records.append({"prompt": prompt, "answer": line if right else "zzz"})
        expected.append(float(right))
    assert 0 < sum(expected) < len(expected)
    data = write_jsonl(tmp_path / "qa.jsonl", records)
    spec = {"name": "g", "path": str(data), "metric": "generate", "max_new_tokens": 6, "extract": "first_line"}
    evaluator = FitnessEvaluator.from_specs([spec], tok, batch_size=5)
    result = evaluator.evaluate(model, record_items=True)
    assert result.item_scores["g"] == expected
    assert evaluator.datasets[0].last_texts == {i: t for i, t in enumerate(reference.texts)}


@pytest.mark.parametrize("family", ["tiny_llama_family", "tiny_mistral_family"])
def test_dfs_cached_generation_equals_uncached(family, request, tiny_tokenizer):
    """Batched, left-padded, rows finishing early (an EOS the model does write), past Mistral's window."""
    from evomerge_opt.dfs.build import build_dfs_candidate

    fam = request.getfixturevalue(family)
    sources = [_load(fam["ft0"]), _load(fam["ft1"])]
    model = build_dfs_candidate(sources, _dfs_recipe())
    tok = tiny_tokenizer
    prompts = [encode(tok, p, False) for p in TINY_PROMPTS[:6]]
    free = greedy_generate(model, tok, prompts, max_new_tokens=24, batch_size=6, eos_token_ids=[])
    # A token the most varied row first writes at step k >= 3 plays EOS: that row ends after k tokens,
    # rows that never write it run to the end, so rows leave the batch at different steps.
    row = max(range(len(prompts)), key=lambda r: len(set(free.tokens[r])))
    k = next(i for i in range(3, 24) if free.tokens[row][i] not in free.tokens[row][:i])
    eos = [free.tokens[row][k]]
    cached = greedy_generate(model, tok, prompts, max_new_tokens=24, batch_size=6, eos_token_ids=eos)
    uncached = greedy_generate(model, tok, prompts, max_new_tokens=24, batch_size=6, eos_token_ids=eos,
                               use_cache=False)
    assert len(cached.tokens[row]) == k and max(len(t) for t in cached.tokens) == 24
    assert cached.tokens == uncached.tokens
    hf_uncached = hf_generate(model, tok, prompts, 24, batch_size=1, eos_token_ids=eos, use_cache=False)
    assert cached.tokens == hf_uncached.tokens
    assert free.tokens == hf_generate(model, tok, prompts, 24, batch_size=6, eos_token_ids=[]).tokens
    with torch.no_grad():
        assert len(model(torch.tensor([prompts[0]]), use_cache=True).past_key_values.layers) == len(
            model.config.hop_table)  # the cache really is indexed by hop


def test_chat_template_renders_the_prompt(tmp_path, digit_tok):
    import copy

    tok = copy.deepcopy(digit_tok)
    tok.chat_template = ("{% for m in messages %}[user] {{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %} [bot]{% endif %}")
    rendered = tok.apply_chat_template([{"role": "user", "content": "q one"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "[user] q one [bot]"
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    answer = tok("the answer is 42.", add_special_tokens=False)["input_ids"]
    model = ScriptedLM({tuple(ids): list(answer)}, len(tok), tok.eos_token_id)  # answers only the chat form
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "q one", "answer": "42"}])
    evaluator = FitnessEvaluator.from_specs([{"name": "c", "path": str(data), "metric": "generate", "chat": True}],
                                            tok)
    assert evaluator.datasets[0].prompts == [ids]
    assert evaluator.evaluate(model).per_dataset["c"].value == 1.0
