"""Random source families for the DFS export tests (plain format, compatibility matrix)."""

from __future__ import annotations

import json
from pathlib import Path


def random_family(root: Path, spec, tokenizer, init_std: float = 0.05, legacy_rope: bool = False) -> dict[str, str]:
    """``{"base", "ft0", "ft1"}`` -> directories of a random model and two perturbed copies (with tokenizer).

    ``init_std`` 0.05 (embedding mean square 2.5e-3) rather than the zoo's 0.02: with 0.02 the hidden
    states of a 2-layer random model stay at mean square 4e-4, where RMSNorm's eps (1e-5) is 2.5% of
    it and dominates what a plain export's fold changes (dfs/plain.py, the eps bound).
    ``legacy_rope``: also write ``rope_theta`` beside ``rope_parameters`` (transformers 4.x ignores the
    latter), so the source loads with the right rotary embedding on every version.
    """
    from evomerge_opt.zoo.random_models import perturbed_copy_, random_model

    out = {}
    for index, name in enumerate(("base", "ft0", "ft1")):
        model = random_model(spec, seed=0, init_std=init_std)
        if index:
            perturbed_copy_(model, 0.02, seed=index)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        if legacy_rope:
            config_file = root / name / "config.json"
            data = json.loads(config_file.read_text())
            data["rope_theta"] = data["rope_parameters"]["rope_theta"]
            config_file.write_text(json.dumps(data, indent=2))
        out[name] = str(root / name)
    return out
