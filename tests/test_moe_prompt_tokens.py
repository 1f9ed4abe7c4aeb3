"""`jaxmerge.tools.moe.prompt_tokens`: the experts' prompts tokenised by a child process (transformers imported
with torch hidden) give the ids of the base tokenizer loaded here, as mergekit-moe loads it (AutoTokenizer with
torch), for the tokenizer kinds models ship; a child that fails or cannot start falls back to tokenising here;
nothing is left running or on disk. `ArraySource`'s computed arrays, which the routers use to wait for the ids,
are checked here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tiny_models as tm
from jaxmerge.formats.safetensors_io import CheckpointError
from jaxmerge.formats.sources import ArraySource
from jaxmerge.tools.moe import prompt_tokens
from jaxmerge.tools.moe.prompt_tokens import PromptTokens, load_tokenizer, tokenize

pytest.importorskip("transformers", reason="the prompts are tokenised with transformers' AutoTokenizer")

PROMPTS = [["w3 w4 w5", "w6"], ["Héllo  wörld, naïve café!", " leading space", "tabs\tand\nnewlines", "数学 and 代码"],
           ["x"]]
CORPUS = ["hello world", "naive cafe with accents: héllo wörld café naïve", "math and code: 1 + 2 = 3",
          "数学 代码 the quick brown fox jumps over the lazy dog", "tabs\tand\nnewlines, leading spaces"] * 20


def _word_level(directory: Path) -> None:
    tm.save_tokenizer(directory)


def _byte_level_bpe(directory: Path) -> None:
    """GPT-2 style: byte-level BPE, one special token for BOS, EOS and padding's fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(directory)


def _llama_class(directory: Path) -> None:
    """tokenizer_class LlamaTokenizer (SentencePiece-style BPE: transformers builds its own pipeline for it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    LlamaTokenizer(vocab=model["vocab"], merges=merges).save_pretrained(directory)


KINDS = {"word_level": (_word_level, "llama"), "byte_level_bpe": (_byte_level_bpe, "gpt2"),
         "llama_class": (_llama_class, "llama")}


@pytest.fixture(scope="module", params=sorted(KINDS))
def tokenizer_dir(request, tmp_path_factory):
    build, model_type = KINDS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    build(directory)
    (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    return directory


def _here(directory: Path) -> list:
    tokenizer = load_tokenizer(directory)
    return [tokenize(tokenizer, prompts) for prompts in PROMPTS]


def _assert_same(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for (ids, mask), (want_ids, want_mask) in zip(got, expected):
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(mask, want_mask)


def test_child_ids_equal_the_tokenizer_loaded_here(tokenizer_dir, monkeypatch):
    expected = _here(tokenizer_dir)
    assert any(m.min() == 0 for _, m in expected)  # left padding is exercised
    tokens = PromptTokens(tokenizer_dir, PROMPTS)
    # The answer must come from the child: tokenising here again would fail the test.
    monkeypatch.setattr(prompt_tokens, "load_tokenizer", lambda _: pytest.fail("tokenised in process"))
    _assert_same(tokens.result(), expected)
    _assert_same(tokens.result(), expected)  # asked twice: the same answer, no second child


@pytest.mark.parametrize("executable", ["/bin/false", "/nonexistent/python"])
def test_a_failed_child_falls_back_to_tokenising_here(tokenizer_dir, monkeypatch, executable):
    expected = _here(tokenizer_dir)
    monkeypatch.setattr(prompt_tokens.sys, "executable", executable)
    _assert_same(PromptTokens(tokenizer_dir, PROMPTS).result(), expected)


def test_no_tokenizer_is_one_line_with_transformers_reason(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(Exception) as direct:  # noqa: PT011 - whatever AutoTokenizer raises here
        load_tokenizer(tmp_path)
    with pytest.raises(prompt_tokens.PromptTokenError) as err:
        PromptTokens(tmp_path, PROMPTS).result()
    message = str(err.value)
    assert message.startswith(f"no tokenizer for the experts' prompts ({type(direct.value).__name__}: ")
    assert "\n" not in message


def _request_file(tokens: PromptTokens) -> Path:
    return Path(tokens._child.args[-1])


def test_the_request_file_is_gone_once_answered(tokenizer_dir):
    tokens = PromptTokens(tokenizer_dir, PROMPTS)
    request = _request_file(tokens)
    tokens.result()
    assert not request.exists()


def test_close_stops_the_child_and_removes_the_request(tokenizer_dir):
    tokens = PromptTokens(tokenizer_dir, PROMPTS)
    child, request = tokens._child, _request_file(tokens)
    tokens.close()
    assert child.poll() is not None and not request.exists()
    tokens.close()  # twice is harmless


def test_a_dropped_request_stops_its_child(tokenizer_dir):
    """A caller that never closes nor asks (a failed plan): collecting the object stops the child."""
    import gc

    tokens = PromptTokens(tokenizer_dir, PROMPTS)
    child, request = tokens._child, _request_file(tokens)
    del tokens
    gc.collect()
    assert child.poll() is not None and not request.exists()


def test_an_interrupted_child_is_not_retried_here(tokenizer_dir, monkeypatch):
    """Ctrl-C reaches the child too: its death by SIGINT is reported, not followed by a second, slow try."""
    import signal

    # As under an interactive shell: a suite started as a background job (`cmd &`) inherits SIGINT
    # ignored, which the child would inherit too. A handled signal is reset to its default at exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        tokens = PromptTokens(tokenizer_dir, PROMPTS)
    finally:
        signal.signal(signal.SIGINT, previous)
    tokens._child.send_signal(signal.SIGINT)
    monkeypatch.setattr(prompt_tokens, "load_tokenizer", lambda _: pytest.fail("tokenised in process"))
    with pytest.raises(prompt_tokens.PromptTokenError, match="stopped by signal 2"):
        tokens.result()


def test_computed_array_source_computes_once_on_the_first_read():
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}

    source = ArraySource("computed", compute, {"a": ((2, 3), np.float32), "b": ((4,), np.float16)})
    assert {n: (i.shape, i.dtype) for n, i in source.tensors.items()} == {"a": ((2, 3), "F32"), "b": ((4,), "F16")}
    assert not calls  # the specs were enough to plan
    np.testing.assert_array_equal(source.read_host("a"), np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(source.read_host("b"), np.ones(4))
    assert calls == [1]
    with pytest.raises(CheckpointError, match="computed: no tensor c"):
        source.read_host("c")


@pytest.mark.parametrize("arrays, what", [
    ({"a": np.zeros((3, 2), np.float32)}, "float32 \\[3, 2\\]"),
    ({"a": np.zeros((2, 3), np.float64)}, "float64 \\[2, 3\\]"),
    ({}, "missing"),
])
def test_computed_arrays_must_match_their_specs(arrays, what):
    source = ArraySource("router weights", lambda: arrays, {"a": ((2, 3), np.float32)})
    with pytest.raises(CheckpointError, match=f"router weights: tensor a was computed as {what}, its spec is F32"):
        source.materialize()
    with pytest.raises(TypeError, match="need their specs"):
        ArraySource("x", lambda: arrays)
