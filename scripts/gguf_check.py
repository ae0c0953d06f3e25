"""Convert model directories to GGUF with llama.cpp's own converter and read back what it wrote.

Runs in the converter's environment (``scripts/compat_env.ensure_gguf_converter``: transformers 4.57.6,
sentencepiece, torch; no evo-merge), as ``python gguf_check.py LLAMA_CPP_DIR JOBS.json``; prints
``REPORT=<json>``. ``JOBS.json`` is ``{"work": DIR, "jobs": [{"name": ..., "dir": MODEL_DIR}, ...]}``.

Per job: the directory is copied, given a SentencePiece ``tokenizer.model`` trained here (llama.cpp
identifies BPE tokenizers by hashing their output against the tokenizers it knows, so a locally made
BPE tokenizer is refused; a SentencePiece model is read as it is), converted with
``convert_hf_to_gguf.py --outtype f32``, and read back with gguf-py: architecture, block count, rope
base, and every tensor compared with the safetensors it came from (q/k projections are permuted by the
converter for llama.cpp's rotary layout, so they are compared after undoing that permutation).
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

assert importlib.util.find_spec("evomerge_opt") is None, "evomerge_opt is importable; this check must run without it"

import numpy as np
from safetensors.numpy import load_file

# GGUF names of a Llama checkpoint's tensors (per layer and global).
LAYER = {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
         "self_attn.o_proj.weight": "attn_output", "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up",
         "mlp.down_proj.weight": "ffn_down", "input_layernorm.weight": "attn_norm",
         "post_attention_layernorm.weight": "ffn_norm"}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}


def _train_sentencepiece(vocab_size: int) -> bytes:
    import sentencepiece as spm

    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "what", "is", "two", "plus", "three",
             "answer", "five", "merge", "model", "layer", "scale", "path"]
    sentences = [" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
                                   minloglevel=2)
    return model.getvalue()


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of the converter's ``LlamaModel.permute`` (rotary halves interleaved for llama.cpp)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check(llama_cpp: Path, model_dir: Path, work: Path) -> dict:
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    copy = work / model_dir.name
    shutil.copytree(model_dir, copy)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (copy / name).unlink(missing_ok=True)
    (copy / "tokenizer.model").write_bytes(_train_sentencepiece(config["vocab_size"]))
    out = work / f"{model_dir.name}.gguf"
    result = subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(copy), "--outfile", str(out),
                             "--outtype", "f32"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"error": result.stderr[-3000:]}
    reader = gguf.GGUFReader(str(out))

    def field(name: str):
        value = reader.fields[name]
        data = value.parts[value.data[0]]
        return bytes(data).decode() if value.types[0] == gguf.GGUFValueType.STRING else data.tolist()[0]

    arch = field("general.architecture")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    state: dict[str, np.ndarray] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(file))
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    mismatched, missing = [], []
    for name, value in state.items():
        if name in GLOBAL:
            gguf_name = GLOBAL[name]
        else:
            parts = name.split(".")
            gguf_name = f"blk.{parts[2]}.{LAYER['.'.join(parts[3:])]}.weight"
        if gguf_name not in tensors:
            missing.append(gguf_name)
            continue
        got = tensors[gguf_name].reshape(value.shape)
        if gguf_name.endswith("attn_q.weight"):
            got = _unpermute(got, heads)
        elif gguf_name.endswith("attn_k.weight"):
            got = _unpermute(got, kv_heads)
        if not np.array_equal(got, value.astype(np.float32)):
            mismatched.append(gguf_name)
    return {"architecture": arch, "block_count": field(f"{arch}.block_count"),
            "rope_freq_base": field(f"{arch}.rope.freq_base"), "tensors": len(tensors), "checkpoint_tensors": len(state),
            "mismatched": mismatched, "missing": missing, "gguf_bytes": out.stat().st_size}


def main() -> int:
    llama_cpp = Path(sys.argv[1])
    with open(sys.argv[2], encoding="utf-8") as handle:
        spec = json.load(handle)
    work = Path(spec["work"])
    report = {}
    for job in spec["jobs"]:
        (work / job["name"]).mkdir(parents=True, exist_ok=True)
        report[job["name"]] = check(llama_cpp, Path(job["dir"]), work / job["name"])
    print("REPORT=" + json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
