"""Session-wide fixtures: tiny random model families (2 layers, hidden 32), built once per session.

Every test runs offline (HF_HUB_OFFLINE=1) and with one torch thread so tests stay deterministic and
cheap on a 2-core machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


def _tiny_tokenizer():
    """A real byte-level BPE tokenizer trained in memory on a few sentences (vocab <= 128)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=128, special_tokens=["<|endoftext|>", "<|pad|>"], initial_alphabet=[], show_progress=False
    )
    text = ["the quick brown fox jumps over the lazy dog", "what is two plus three? the answer is five."] * 20
    tok.train_from_iterator(text, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tiny_tokenizer()


@pytest.fixture(scope="session", autouse=True)
def _isolated_evomerge_home(tmp_path_factory: pytest.TempPathFactory):
    """Keep caches of tests out of the user's ~/.cache unless a test sets EVOMERGE_HOME itself."""
    if "EVOMERGE_HOME" not in os.environ:
        os.environ["EVOMERGE_HOME"] = str(tmp_path_factory.mktemp("evomerge_home"))
    yield


def _family(tmp_path_factory: pytest.TempPathFactory, spec, name: str, tokenizer, **kwargs) -> dict[str, Path]:
    from evomerge_opt.zoo.random_models import save_random_family

    return save_random_family(spec, tmp_path_factory.mktemp(name), tokenizer=tokenizer, **kwargs)


@pytest.fixture(scope="session")
def tiny_llama_family(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """{'base', 'ft0', 'ft1'} -> dirs of a 2-layer Llama (hidden 32, GQA 4/2 heads), several shards, fp32."""
    from evomerge_opt.zoo.random_models import TINY_LLAMA

    return _family(tmp_path_factory, TINY_LLAMA, "tiny_llama", tiny_tokenizer, max_shard_size="20KB")


@pytest.fixture(scope="session")
def tiny_llama_tied_bf16_family(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """Same sizes with tied embeddings, stored in bf16, one shard."""
    from evomerge_opt.zoo.random_models import TINY_LLAMA

    spec = TINY_LLAMA.model_copy(update={"tie_word_embeddings": True, "dtype": "bfloat16"})
    return _family(tmp_path_factory, spec, "tiny_llama_tied", tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_mistral_family(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """{'base', 'ft0', 'ft1'} -> dirs of a 2-layer Mistral with sliding window 16, fp32."""
    from evomerge_opt.zoo.random_models import TINY_MISTRAL

    return _family(tmp_path_factory, TINY_MISTRAL, "tiny_mistral", tiny_tokenizer)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU tests cleanly when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def pg_url() -> str:
    """SQLAlchemy URL of the throw-away PostgreSQL server (scripts/postgres.sh); skips when none is set."""
    url = os.environ.get("EVOMERGE_TEST_PG_URL")
    if not url:
        pytest.skip("EVOMERGE_TEST_PG_URL is not set (start a server with `bash scripts/postgres.sh start`)")
    return url
