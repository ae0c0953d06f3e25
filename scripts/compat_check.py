"""Load saved DFS / plain model directories with ONE transformers version and check what they compute.

Runs inside a throw-away environment from ``scripts/compat_env.py`` (torch + safetensors + one
transformers, no evo-merge: asserted), as ``python compat_check.py JOBS.json``; prints one line
``REPORT=<json>``. ``JOBS.json``::

    {"jobs": [{"dir": ..., "kind": "causal"|"seqcls", "remote": true|false,
               "reference": "ref.safetensors",   # ids, attention_mask, logits computed by the pinned version
               "compare_to": DIR | null,         # a plain source dir that must give exactly the same logits
               "generate": true|false, "attn": "eager" | null}, ...]}

Per job it reports the class and module that loaded, max |logits - reference| (fp32), whether the logits
equal ``compare_to``'s exactly (same process, same transformers), whether greedy generation with the KV
cache equals generation without it (one unpadded prompt and a left-padded batch), and every warning
raised while loading and running (FutureWarnings about deprecated keywords included).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import warnings

assert importlib.util.find_spec("evomerge_opt") is None, "evomerge_opt is importable; this check must run without it"

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

torch.set_num_threads(1)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}"[:300])


def _load(job: dict, directory: str):
    auto = AutoModelForCausalLM if job["kind"] == "causal" else AutoModelForSequenceClassification
    kwargs = {"trust_remote_code": True} if job.get("remote") else {}
    if job.get("attn"):
        kwargs["attn_implementation"] = job["attn"]
    return auto.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()


def _generate_pair(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> tuple[bool, list]:
    common = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, **common)
        uncached = model.generate(ids, attention_mask=mask, use_cache=False, **common)
    return bool(torch.equal(cached, uncached)), cached.tolist()


def check(job: dict) -> dict:
    handler = _Collect()
    logging.getLogger("transformers").addHandler(handler)
    entry: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _load(job, job["dir"])
        ref = load_file(job["reference"])
        entry["class"] = type(model).__name__
        entry["module"] = type(model).__module__
        with torch.no_grad():
            logits = model(ref["ids"], attention_mask=ref["attention_mask"]).logits.float()
        entry["finite"] = bool(torch.isfinite(logits).all())
        entry["max_abs_diff_vs_reference"] = float((logits - ref["logits"]).abs().max())
        entry["reference_scale"] = float(ref["logits"].abs().max())
        if job.get("compare_to"):
            other = _load({"kind": job["kind"], "remote": False}, job["compare_to"])
            with torch.no_grad():
                expected = other(ref["ids"], attention_mask=ref["attention_mask"]).logits.float()
            entry["equal_to_compare"] = bool(torch.equal(logits, expected))
            entry["max_abs_diff_vs_compare"] = float((logits - expected).abs().max())
        if job.get("generate"):
            ids, mask = ref["ids"][:1], ref["attention_mask"][:1]
            entry["generate_equal"], entry["generated"] = _generate_pair(model, ids, mask, job.get("new_tokens", 24))
            # A left-padded batch: the padded prompt must give the same tokens with and without the cache.
            padded = ref["ids"][:2].clone()
            padded_mask = torch.ones_like(padded)
            padded[1, :3], padded_mask[1, :3] = 0, 0
            entry["generate_padded_equal"], _ = _generate_pair(model, padded, padded_mask, job.get("new_tokens", 24))
    logging.getLogger("transformers").removeHandler(handler)
    entry["warnings"] = [f"{w.category.__name__}: {w.message}"[:300] for w in caught] + handler.messages
    return entry


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as handle:
        spec = json.load(handle)
    import transformers

    report: dict = {"transformers": transformers.__version__, "torch": torch.__version__, "jobs": {}}
    for job in spec["jobs"]:
        try:
            report["jobs"][job["name"]] = check(job)
        except Exception as exc:  # noqa: BLE001 (reported per job: one broken directory must not hide the others)
            report["jobs"][job["name"]] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    assert "evomerge_opt" not in sys.modules
    print("REPORT=" + json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
