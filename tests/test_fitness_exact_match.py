"""`metric: exact_match` (teacher-forced, one forward pass) equals real greedy generation, and `choice`."""

from __future__ import annotations

import pytest
import torch
from _fitness_helpers import TINY_PROMPTS, write_jsonl

from evomerge_opt.fitness.evaluator import FitnessEvaluator
from evomerge_opt.fitness.forward import encode
from evomerge_opt.fitness.generation import hf_generate
from evomerge_opt.fitness.metrics.exact_match import answer_variants


def _model(kind: str, request):
    from evomerge_opt.pool import load_causal_lm
    from evomerge_opt.zoo.random_models import TINY_LLAMA, TINY_MISTRAL, random_model

    if kind == "random_llama":
        return random_model(TINY_LLAMA, seed=3).float()
    if kind == "random_mistral":
        return random_model(TINY_MISTRAL, seed=4).float()
    if kind == "dfs":  # a DFS candidate: layers of two sources by reference, scaled hops
        from evomerge_opt.dfs.build import build_dfs_candidate

        fam = request.getfixturevalue("tiny_mistral_family")
        sources = [load_causal_lm(str(fam[k])) for k in ("ft0", "ft1")]
        recipe = {"model_paths": ["a", "b"], "num_r": 2, "layer_mask": [[[True, True], [False, True]]] * 2,
                  "scaling_factors": [[[1.0, 0.9], [None, 1.1]], [[0.8, 1.0], [None, 1.2]]],
                  "input_layer_model": 0, "output_layer_model": 1}
        return build_dfs_candidate(sources, recipe)
    family, member = kind.split(":")
    return load_causal_lm(str(request.getfixturevalue(family)[member]))


def _records_from_greedy(model, tok, delimiter: str, new_tokens: int = 3):
    """Half the answers are what greedy decoding writes, half a corrupted version of it.

    A "right" answer is the longest prefix (<= new_tokens tokens) of the greedy output whose text
    tokenises back to the same tokens after the prompt (a random model often writes token sequences
    that no text tokenises to, e.g. " p" + "lus" for " plus")."""
    from evomerge_opt.fitness.forward import continuation_tokens

    prompts = [encode(tok, p, False) for p in TINY_PROMPTS]
    greedy = hf_generate(model, tok, prompts, max_new_tokens=new_tokens, batch_size=1, eos_token_ids=[])
    records = []
    for i, (prompt, ids, tokens) in enumerate(zip(TINY_PROMPTS, prompts, greedy.tokens)):
        if i % 2 == 1:  # wrong: the greedy text with its last token replaced
            text = tok.decode(tokens[:-1] + [(tokens[-1] + 1) % len(tok)])
        else:
            text = tok.decode(tokens)
            for k in range(len(tokens), 0, -1):
                candidate = tok.decode(tokens[:k])
                if candidate.startswith(delimiter) and continuation_tokens(tok, ids, prompt, candidate, False) == tokens[:k]:
                    text = candidate
                    break
        answer = text[len(delimiter):] if delimiter and text.startswith(delimiter) else text
        if answer:  # greedy may write just the delimiter: nothing left to ask for
            records.append({"prompt": prompt, "answer": answer})
    return records


def _greedy_writes(model, tok, prompt_ids, targets) -> bool:
    """Real greedy generation (HF generate, unpadded, with the cache) writes one of the target sequences."""
    longest = max(len(t) for t in targets)
    written = hf_generate(model, tok, [prompt_ids], max_new_tokens=longest, batch_size=1, eos_token_ids=[]).tokens[0]
    return any(written[: len(t)] == t for t in targets)


@pytest.mark.parametrize("kind", ["random_llama", "random_mistral", "tiny_llama_family:base",
                                  "tiny_mistral_family:ft0", "tiny_llama_tied_bf16_family:ft1", "dfs"])
@pytest.mark.parametrize("delimiter", ["", " "])
def test_teacher_forced_equals_greedy_generation(kind, delimiter, request, tiny_tokenizer, tmp_path):
    model = _model(kind, request)
    tok = tiny_tokenizer
    records = _records_from_greedy(model, tok, delimiter)
    data = write_jsonl(tmp_path / "qa.jsonl", records)
    spec = {"name": "em", "path": str(data), "metric": "exact_match", "target_delimiter": delimiter}
    evaluator = FitnessEvaluator.from_specs([spec], tok, batch_size=5)  # batched and left-padded
    result = evaluator.evaluate(model, record_items=True)
    metric = evaluator.datasets[0]
    expected = [float(_greedy_writes(model, tok, p, t)) for p, t in metric.items]
    assert result.item_scores["em"] == expected
    assert 0 < sum(expected) < len(expected)  # some right, some wrong
    assert result.per_dataset["em"].value == sum(expected) / len(expected)
    assert result.per_dataset["em"].extracted == 1.0


def test_casefold_and_strip_accept_variants(tiny_llama_family, tiny_tokenizer, tmp_path):
    from evomerge_opt.pool import load_causal_lm

    model = load_causal_lm(str(tiny_llama_family["base"]))
    tok = tiny_tokenizer
    records = _records_from_greedy(model, tok, " ")
    # Upper-cased (and padded) versions of the answers: wrong as given, right when case is folded,
    # as far as greedy writes the folded variant; the check is still real generation.
    shouted = [{"prompt": r["prompt"], "answer": f"  {r['answer'].upper()} "} for r in records]
    data = write_jsonl(tmp_path / "qa.jsonl", shouted)
    plain = FitnessEvaluator.from_specs([{"name": "p", "path": str(data), "metric": "exact_match"}], tok)
    folded = FitnessEvaluator.from_specs([{"name": "f", "path": str(data), "metric": "exact_match",
                                           "normalize": ["strip", "casefold"]}], tok)
    plain_scores = plain.evaluate(model, record_items=True).item_scores["p"]
    folded_scores = folded.evaluate(model, record_items=True).item_scores["f"]
    expected = [float(_greedy_writes(model, tok, p, t)) for p, t in folded.datasets[0].items]
    assert folded_scores == expected and sum(folded_scores) > sum(plain_scores) == 0
    assert answer_variants(" Paris ", ["strip", "casefold"]) == ["Paris", "paris", "PARIS"]


def test_nan_model_is_nan_not_zero(tiny_llama_family, tiny_tokenizer, tmp_path):
    from evomerge_opt.pool import load_causal_lm

    model = load_causal_lm(str(tiny_llama_family["base"]))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "the quick", "answer": "fox"}])
    evaluator = FitnessEvaluator.from_specs([{"name": "em", "path": str(data), "metric": "exact_match"}],
                                            tiny_tokenizer)
    steps = []
    result = evaluator.evaluate(model, on_batch=lambda s, v: steps.append(v))
    assert result.value != result.value and steps[0] != steps[0]  # NaN: the search fails such a candidate
    assert any("NaN/inf" in w for w in result.warnings)
