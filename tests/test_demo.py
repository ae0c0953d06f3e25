"""``python -m evomerge_opt.demo`` end to end on the small zoo preset, and its table rendering."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge_opt.demo import format_table

REPO = Path(__file__).resolve().parents[1]


def test_format_table_lists_every_model_and_score() -> None:
    rows = [("math", {"english": 12.5, "lang": 900.0, "math_en": 2.0, "math_lang": 300.0, "math_en_acc": 0.5,
                      "math_lang_acc": 0.0}),
            ("evolved", {"english": 13.0, "math_lang": 40.25, "math_lang_acc": 0.125})]
    text = format_table(rows, "title")
    lines = text.splitlines()
    assert lines[0] == "title" and lines[2].startswith("| model | ppl English")
    assert "| math | 12.50 | 900.00 | 2.00 | 300.00 | 50.0% | 0.0% |" in lines
    assert "| evolved | 13.00 | - | - | 40.25 | - | 12.5% |" in lines


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", EVOMERGE_HOME=str(tmp_path / "home"))
    command = [sys.executable, "-m", "evomerge_opt.demo", "--preset", "small", "--trials", "8",
               "--space", str(REPO / "search_spaces" / "ps_dfs.yaml"), "--zoo-root", str(tmp_path / "zoo"),
               "--out", str(tmp_path / "out"), "--study", "test_demo"]
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "out" / "table.md").read_text()
    for name in ("base", "math", "lang", "ties_0.5 (untuned)", "dare_ties_0.5 (untuned)", "evolved (PS+DFS)"):
        assert f"| {name} |" in table
    assert "nan" not in table.lower()
    assert (tmp_path / "studies" / "test_demo.db").is_file()
    assert (tmp_path / "recipes" / "best_test_demo.yaml").is_file()
