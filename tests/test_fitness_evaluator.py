"""The fitness evaluator over many datasets: today's perplexity exactly, the combined rule's sign and
direction, multi-objective values, budgets, callbacks; and every bad input, refused before a model loads."""

from __future__ import annotations

import math

import pytest
import torch
from _fitness_helpers import TINY_PROMPTS, write_jsonl

from evomerge_opt.cli.main import main
from evomerge_opt.errors import ConfigError
from evomerge_opt.fitness.checks import fitness_objectives, fitness_problems, parse_fitness_dataset
from evomerge_opt.fitness.combine import combine, objective_for
from evomerge_opt.fitness.evaluator import FitnessEvaluator
from evomerge_opt.fitness.perplexity import PerplexityEvaluator

TEXTS = ["the quick brown fox jumps over the lazy dog", "what is two plus three? the answer is five.",
         "the lazy dog", "two plus three is five", "the answer is five", "jumps over the lazy fox"]


@pytest.fixture(scope="module")
def model(tiny_llama_family):
    from evomerge_opt.pool import load_causal_lm

    return load_causal_lm(str(tiny_llama_family["base"]))


@pytest.fixture
def files(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(TEXTS) + "\n")
    text2 = tmp_path / "more.txt"
    text2.write_text("\n".join(reversed(TEXTS)) + "\n")
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": p, "answer": "fox"} for p in TINY_PROMPTS])
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": p, "choices": ["fox", "the lazy dog"], "label": i % 2}
                                             for i, p in enumerate(TINY_PROMPTS)])
    return {"text": text, "more": text2, "qa": qa, "mc": mc, "dir": tmp_path}


def test_perplexity_only_is_todays_value_exactly(model, tiny_tokenizer, files):
    specs = [{"name": "a", "path": str(files["text"]), "seq_len": 16, "weight": 2.0},
             {"name": "b", "path": str(files["more"]), "seq_len": 8}]
    old = PerplexityEvaluator.from_specs(specs, tiny_tokenizer, batch_size=2)
    new = FitnessEvaluator.from_specs(specs, tiny_tokenizer, batch_size=2)
    old_steps, new_steps = [], []
    want = old.evaluate(model, on_batch=lambda s, v: old_steps.append((s, v)))
    got = new.evaluate(model, on_batch=lambda s, v: new_steps.append((s, v)))
    assert got.value == want.perplexity and got.values == [want.perplexity]  # bit for bit
    assert new_steps == old_steps
    assert got.tokens == want.tokens and got.complete
    assert {k: v.value for k, v in got.per_dataset.items()} == {k: v.perplexity for k, v in want.per_dataset.items()}
    assert {k: v.cost for k, v in got.per_dataset.items()} == {k: v.loss for k, v in want.per_dataset.items()}
    assert new.objective_names == ["perplexity"] and new.directions == ["minimize"]
    assert got.per_dataset["a"].to_attrs() == {"metric": "perplexity", "value": want.per_dataset["a"].perplexity,
                                               "n": 6, "extracted": None}
    # The same batches, in the same order, with the same budget semantics.
    assert old.evaluate(model, max_batches=3).perplexity == new.evaluate(model, limit=3).value


def test_combined_rule_sign_and_direction():
    assert objective_for(["perplexity", "perplexity"]) == ("perplexity", "minimize")
    assert objective_for(["accuracy", "accuracy"]) == ("accuracy", "maximize")
    assert objective_for(["accuracy", "perplexity"]) == ("cost", "minimize")
    losses, weights = [math.log(10.0), math.log(40.0)], [1.0, 3.0]
    assert combine(["perplexity"] * 2, [10.0, 40.0], losses, weights) == pytest.approx(
        math.exp((math.log(10) + 3 * math.log(40)) / 4))
    assert combine(["accuracy"] * 2, [0.5, 0.9], [0.5, 0.1], weights) == pytest.approx((0.5 + 3 * 0.9) / 4)
    # Mixed: a higher accuracy must LOWER the minimised value, a higher perplexity must raise it.
    mixed = ["accuracy", "perplexity"]
    worse = combine(mixed, [0.2, 10.0], [0.8, math.log(10.0)], [1.0, 1.0])
    better_acc = combine(mixed, [0.6, 10.0], [0.4, math.log(10.0)], [1.0, 1.0])
    worse_ppl = combine(mixed, [0.2, 20.0], [0.8, math.log(20.0)], [1.0, 1.0])
    assert better_acc < worse < worse_ppl
    assert worse == pytest.approx((0.8 + math.log(10.0)) / 2)
    assert math.isnan(combine([], [], [], []))


def test_mixed_datasets_single_and_multi_objective(model, tiny_tokenizer, files):
    specs = [{"name": "ppl", "path": str(files["text"]), "seq_len": 16},
             {"name": "em", "path": str(files["qa"]), "metric": "exact_match", "weight": 2.0},
             {"name": "mc", "path": str(files["mc"]), "metric": "choice", "normalize": "length"}]
    single = FitnessEvaluator.from_specs(specs, tiny_tokenizer, batch_size=4)
    assert single.objective_names == ["cost"] and single.directions == ["minimize"]
    assert fitness_objectives(specs) == (["cost"], ["minimize"])
    result = single.evaluate(model)
    r = result.per_dataset
    expected = (1 * r["ppl"].cost + 2 * (1 - r["em"].value) + 1 * (1 - r["mc"].value)) / 4
    assert result.value == pytest.approx(expected, abs=1e-12)
    assert r["ppl"].direction == "minimize" and r["em"].direction == r["mc"].direction == "maximize"
    assert 0.0 <= r["mc"].value <= 1.0 and r["mc"].n == len(TINY_PROMPTS) and r["mc"].extracted == 1.0
    multi = FitnessEvaluator.from_specs(specs, tiny_tokenizer, batch_size=4, multi_objective=True)
    assert multi.objective_names == ["ppl", "em", "mc"]
    assert multi.directions == ["minimize", "maximize", "maximize"]
    assert fitness_objectives(specs, multi_objective=True) == (multi.objective_names, multi.directions)
    values = multi.evaluate(model).values
    assert values == [r["ppl"].value, r["em"].value, r["mc"].value]  # each in its own unit


def test_budget_callbacks_and_training_flag(model, tiny_tokenizer, files):
    specs = [{"name": "em", "path": str(files["qa"]), "metric": "exact_match"},
             {"name": "mc", "path": str(files["mc"]), "metric": "choice"}]
    evaluator = FitnessEvaluator.from_specs(specs, tiny_tokenizer, batch_size=3)
    assert evaluator.num_batches == 12
    full = evaluator.evaluate(model, record_items=True)
    reports = []
    partial = evaluator.evaluate(model, limit=5, on_report=reports.append, record_items=True)
    assert not partial.complete and partial.batches == 5 and full.complete
    seen = evaluator.items_through(4)
    assert {k: v.n for k, v in partial.per_dataset.items()} == {k: v for k, v in seen.items() if v}
    # The first n questions of each dataset: a prefix of the full evaluation's item scores.
    for name, scores in partial.item_scores.items():
        assert scores == full.item_scores[name][: len(scores)]
    assert [r.step for r in reports] == list(range(5)) and reports[-1].running == partial.value
    assert all(0.0 <= r.batch_cost <= 1.0 for r in reports) and reports[-1].tokens == partial.tokens

    class Stop(Exception):
        pass

    def prune(step, running):
        if step == 2:
            raise Stop(running)

    model.train()
    with pytest.raises(Stop):
        evaluator.evaluate(model, on_batch=prune)
    assert model.training  # restored even when the callback raised
    model.eval()


# ------------------------------------------------------------------------------------------ bad input


def _problems(entry, tmp_path=None, check_data=True):
    return fitness_problems([entry], check_data=check_data)


@pytest.mark.parametrize(("entry", "words"), [
    ({"path": "x.jsonl", "metric": "accuracy"}, ["unknown metric 'accuracy'", "choice, exact_match, generate"]),
    ({"path": "x.jsonl", "metric": "generate", "max_new_tokens": 0}, ["`max_new_tokens > 0`", "got 0"]),
    ({"path": "x.jsonl", "metric": "generate", "max_new_tokens": -3}, ["`max_new_tokens > 0`"]),
    ({"path": "x.jsonl", "metric": "generate", "extract": "regex:answer (\\d+) or (\\d+)"}, ["exactly one", "has 2"]),
    ({"path": "x.jsonl", "metric": "generate", "extract": "regex:answer \\d+"}, ["exactly one", "has 0"]),
    ({"path": "x.jsonl", "metric": "generate", "extract": "regex:(unclosed"}, ["valid regular expression"]),
    ({"path": "x.jsonl", "metric": "generate", "extract": "last_word"}, ["`extract` must be one of"]),
    ({"path": "x.jsonl", "metric": "exact_match", "seq_len": 64}, ["['seq_len'] do not apply", "exact_match"]),
    ({"path": "x.jsonl", "metric": "perplexity", "prompt_field": "q"}, ["['prompt_field'] do not apply"]),
    ({"path": "x.jsonl", "metric": "choice", "normalize": "strip"}, ["none, length, bytes"]),
    ({"path": "x.jsonl", "metric": "exact_match", "normalize": "lower"}, ["['strip', 'casefold']"]),
])
def test_bad_schema_is_refused(entry, words):
    problems = fitness_problems([entry])
    assert len(problems) == 1 and problems[0].startswith("fitness.datasets[0]: ")
    for word in words:
        assert word in problems[0], problems[0]


def test_bad_records_are_refused(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}, {"question": "r", "answer": "b"}])
    problems = _problems({"path": str(qa), "metric": "exact_match"})
    assert "every record lack(s) the field 'prompt' (`prompt_field`)" in problems[0]
    assert "['answer', 'question']" in problems[0]  # names the fields that are there
    assert _problems({"path": str(qa), "metric": "exact_match", "prompt_field": "question"}) == []
    some = write_jsonl(tmp_path / "some.jsonl", [{"prompt": "q", "answer": "a"}, {"prompt": "r"}])
    assert "records 1 lack(s) the field 'answer'" in _problems({"path": str(some), "metric": "generate",
                                                               "compare": "exact"})[0]
    words = write_jsonl(tmp_path / "words.jsonl", [{"prompt": "q", "answer": "seven"}])
    assert "`compare: numeric` needs numeric answers" in _problems({"path": str(words), "metric": "generate"})[0]
    assert _problems({"path": str(words), "metric": "generate", "extract": "first_line"}) == []
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "q", "choices": ["a", "b"], "label": 1},
                                             {"prompt": "q", "choices": ["a", "b"], "label": 2},
                                             {"prompt": "q", "choices": ["a", "b"], "label": "c"},
                                             {"prompt": "q", "choices": ["a"], "label": 0}])
    problems = _problems({"path": str(mc), "metric": "choice"})
    assert any("records 1, 2 are out of range" in p and "label 2 with 2 choices" in p for p in problems)
    assert any("at least 2 strings, but records 3" in p for p in problems)
    assert "label_field" in " ".join(_problems({"path": str(mc), "metric": "choice", "label_field": "gold"}))
    assert "does not exist" in _problems({"path": str(tmp_path / "nope.jsonl"), "metric": "choice"})[0]


def test_bad_input_fails_before_the_model_loads(tmp_path, tiny_tokenizer, capsys):
    """The CLI checks every dataset before it loads anything: the model path here does not even exist."""
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "q", "choices": ["a", "b"], "label": 5}])
    missing_model = str(tmp_path / "no_such_model")
    for data, word in [
        (f"{{path: {mc}, metric: choice}}", "out of range"),
        (f"{{path: {mc}, metric: exact_match}}", "lack(s) the field 'answer'"),
        (f"{{path: {mc}, metric: generate, max_new_tokens: 0}}", "`max_new_tokens > 0`"),
        (f"{{path: {mc}, metric: generate, extract: 'regex:(a)(b)'}}", "exactly one capturing group"),
    ]:
        assert main(["eval", missing_model, "--data", data]) == 2
        err = capsys.readouterr().err
        assert word in err and "no_such_model" not in err, err
    # A chat template is required when asked for (checked when the data are prepared: no model yet).
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match="no chat template"):
        FitnessEvaluator.from_specs([{"path": str(qa), "metric": "generate", "chat": True, "compare": "exact"}],
                                    tiny_tokenizer)


def test_lm_eval_entries_are_checked(monkeypatch):
    import evomerge_opt.fitness.checks as spec_module

    monkeypatch.setattr(spec_module, "lm_eval_available", lambda: False)
    problems = fitness_problems([], [{"task": "arc_easy"}])
    assert problems == [("fitness.lm_eval[0]: lm-evaluation-harness is not installed; install it with "
                        "`pip install 'evomerge-opt[lmeval]'`.")]
    assert "unknown key" in fitness_problems([], [{"task": "arc_easy", "shots": 5}])[0]
    assert "at least one dataset" in fitness_problems([], [])[0]


def test_unknown_lm_eval_task_and_metric():
    pytest.importorskip("lm_eval")
    from pathlib import Path

    tasks = str(Path(__file__).parent / "lm_eval_tasks")
    unknown = fitness_problems([], [{"task": "evomerge_tiny_choise", "include_path": tasks}])
    assert "Unknown lm-eval task 'evomerge_tiny_choise'" in unknown[0] and "evomerge_tiny_choice" in unknown[0]
    metric = fitness_problems([], [{"task": "evomerge_tiny_choice", "include_path": tasks, "metric": "bleu"}])
    assert metric == [("fitness.lm_eval[0]: lm-eval task 'evomerge_tiny_choice' has no metric 'bleu'; its metrics "
                      "are: acc, acc_norm.")]
    assert "not a directory" in fitness_problems([], [{"task": "x", "include_path": tasks + "/nope"}])[0]
    duplicate = fitness_problems([{"name": "evomerge_tiny_choice", "path": "x.txt"}],
                                 [{"task": "evomerge_tiny_choice", "include_path": tasks}])
    assert "must be unique" in duplicate[-1]


def test_cli_defaults_only_fill_keys_the_metric_reads():
    spec = parse_fitness_dataset({"path": "x.jsonl", "metric": "exact_match"}, seq_len=64, packing=True,
                                 num_samples=5)
    assert spec.num_samples == 5 and "seq_len" not in spec.model_fields_set
    assert parse_fitness_dataset("x.txt", seq_len=64).seq_len == 64


def test_eval_cli_metric_aware_output(model, tiny_llama_family, files, capsys, tmp_path):
    import json

    from evomerge_opt.config.yamlio import save_yaml

    section = {"datasets": [{"name": "em", "path": str(files["qa"]), "metric": "exact_match"},
                            {"name": "mc", "path": str(files["mc"]), "metric": "choice"}], "batch_size": 4}
    yml = save_yaml(section, tmp_path / "fitness.yaml")
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_llama_family["base"]), "--data", str(yml), "--data", f"ppl={files['text']}",
                 "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["per_dataset"]) == {"em", "mc", "ppl"}
    assert result["objective_names"] == ["cost"] and result["directions"] == ["minimize"]
    lines = {line.split()[0]: line.split() for line in printed.splitlines() if line.strip()}
    assert lines["em"][1] == "exact_match" and lines["mc"][1] == "choice" and lines["ppl"][1] == "perplexity"
    assert float(lines["ppl"][2]) == pytest.approx(result["per_dataset"]["ppl"]["value"], rel=1e-4)
    assert lines["ppl"][4] == "-"  # no extraction rate for perplexity
    assert "aggregate" in lines and lines["aggregate"][1] == "cost"
    # The same section through the search's entry point gives the same numbers.
    from evomerge_opt.pool import load_tokenizer

    evaluator = FitnessEvaluator.from_section(section, load_tokenizer(str(tiny_llama_family["base"])))
    assert evaluator.evaluate(model).per_dataset["mc"].value == result["per_dataset"]["mc"]["value"]
    assert not torch.is_inference_mode_enabled()
