"""The output vocabulary and the aligned embedding rows of `jaxmerge.recipes.tokenizer`, against mergekit 0.1.5.

Tiny Llama models (tests/tiny_models.py) are varied: `chat`/`chat2` add the
ChatML tokens and grow their embeddings, `padded` has embedding rows beyond its
tokenizer, `other` has another vocabulary (permuted, ten tokens dropped, ten
new). mergekit-yaml runs `linear` recipes over them with union, base and model
tokenizer sources, `tokens:` rules and padding; the tokenizer built here must
hold mergekit's tokens, and the aligned embeddings and LM heads merged with the
recipe's weights must equal mergekit's output, token by token.
"""

from __future__ import annotations

import importlib.resources
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import tiny_models as tm
from jaxmerge.formats.safetensors_io import CheckpointError
from jaxmerge.recipes.tokenizer import (
    CHAT_TEMPLATE_DIR,
    TEMPLATE_NAMES,
    GroupPlan,
    RowPlan,
    Vocabulary,
    align_rows,
    build_vocabulary,
    resolve_chat_template,
)

pytest.importorskip("transformers")
pytest.importorskip("mergekit")

TOL = dict(rtol=1e-5, atol=1e-6)
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
CHATML = ["<|im_start|>", "<|im_end|>"]
TOKENIZER_FILES = ("tokenizer", "chat_template", "special_tokens_map", "added_tokens")
LITERAL = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


# ---------------------------------------------------------------------------------------------
# Models


def _with_chat_tokens(src: Path, dst: Path) -> None:
    """`src` with the ChatML tokens added (special) and its embeddings resized to the new vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(CHATML, special_tokens=True)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


def _padded(src: Path, dst: Path, rows: int) -> None:
    """`src` with `rows` embedding rows (config vocab_size) and its 128-token tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(2)
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.resize_token_embeddings(rows)
    model.save_pretrained(dst)
    tm.save_tokenizer(dst)


def _other_vocabulary(src: Path, dst: Path) -> None:
    """`src`'s weights with another word-level vocabulary: v0..v9 new, w3..w12 dropped, the rest reversed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(src, dst)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (dst / f).unlink(missing_ok=True)
    words = [f"v{i}" for i in range(10)] + [f"w{i}" for i in range(tm.VOCAB - 1, 12, -1)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    assert len(vocab) == tm.VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(dst)


def _bpe_model(dst: Path, seed: int) -> None:
    """A Llama with a BPE tokenizer whose 2 added tokens are past its embedding's rows."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world"] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_tokens(["<|a|>", "<|b|>"], special_tokens=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**tm.LLAMA, "vocab_size": len(fast) - 2})).save_pretrained(dst)
    fast.save_pretrained(dst)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokmodels")
    base, ft1, ft2, ft3 = tm.make_family(root, "llama", 3)
    z = {"base": base, "chat": root / "chat", "chat2": root / "chat2", "padded": root / "padded", "other": root / "other"}
    _with_chat_tokens(ft1, z["chat"])
    _with_chat_tokens(ft2, z["chat2"])
    _padded(ft3, z["padded"], 136)
    _other_vocabulary(ft2, z["other"])
    notok = root / "notok"
    notok.mkdir()
    shutil.copyfile(base / "config.json", notok / "config.json")
    shutil.copyfile(base / "model.safetensors", notok / "model.safetensors")
    z["notok"] = notok
    z["bpe"], z["bpe2"] = root / "bpe", root / "bpe2"
    _bpe_model(z["bpe"], 3)
    _bpe_model(z["bpe2"], 4)
    return z


# ---------------------------------------------------------------------------------------------
# Recipes: each is (models with weights, base_model, tokenizer settings, chat_template)


def _cases(z: dict[str, Path]) -> dict[str, dict]:
    p = {k: str(v) for k, v in z.items()}
    return {
        # w3..w12 missing in `other` (base has them), v* only in `other`, ChatML in chat and chat2 only.
        "union_base": dict(models={"base": 0.2, "chat": 0.5, "chat2": 0.1, "other": 0.3}, base="base",
                           top={"tokenizer_source": "union", "chat_template": "chatml"}),
        # No base_model: w3..w12 from the mean of chat and padded; ChatML from chat alone; padding to 64.
        "union_nobase": dict(models={"chat": 0.6, "padded": 0.3, "other": 0.4}, base=None,
                             top={"tokenizer": {"source": "union", "pad_to_multiple_of": 64}, "chat_template": "llama3"}),
        "base_source": dict(models={"chat": 0.5, "base": 0.3, "other": 0.2}, base="chat",
                            top={"tokenizer_source": "base", "chat_template": LITERAL}),
        "model_source": dict(models={"base": 0.5, "chat": 0.25, "other": 0.25}, base="base",
                             top={"tokenizer_source": p["other"]}),
        # tokens: rules over a model source (chat's 130 tokens, <|new|> added): w3..w12 missing in `other`.
        "tokens": dict(models={"base": 0.4, "chat": 0.3, "chat2": 0.2, "other": 0.1}, base="base", top={"tokenizer": {
            "source": p["chat"],
            "pad_to_multiple_of": 48,
            "tokens": {
                "<|im_start|>": {"source": p["chat2"]},
                "<|im_end|>": {"source": {"kind": "zero"}},
                "w20": {"source": p["other"], "force": True},
                "w5": {"source": {"kind": "model_token", "model": p["chat"], "token": "w7"}},
                "<|new|>": {"source": {"kind": "model_token", "model": p["other"], "token_id": 3}},
                "w9": {"source": {"kind": "zero"}, "force": True},
                "w30": {"source": p["chat"]},
            },
        }}),
        "tokens_union": dict(models={"base": 0.4, "chat": 0.3, "chat2": 0.2, "other": 0.1}, base="base", top={"tokenizer": {
            "source": "union",
            "tokens": {"<|im_start|>": {"source": p["chat2"], "force": True}, "w5": {"source": {"kind": "zero"}}},
        }}),
        # source: base adds `tokens:` to the base's own tokenizer: a padded base "has" the new ones at its padding rows.
        "base_padded_tokens": dict(models={"padded": 0.5, "chat": 0.5}, base="padded", top={"tokenizer": {
            "source": "base",
            "tokens": {"<|im_end|>": {"source": p["chat"]}, "<|new|>": {"source": {"kind": "zero"}}},
        }}),
        # The base's tokenizer runs past its embedding: mergekit drops those tokens (BPE only).
        "bpe_strip": dict(models={"bpe": 0.5, "bpe2": 0.5}, base="bpe", top={"tokenizer_source": "base"}),
        "union_padded_base": dict(models={"padded": 0.5, "chat": 0.5}, base="padded",
                                  top={"tokenizer": {"source": "union", "pad_to_multiple_of": 7}}),
    }


def _recipe_yaml(case: dict, z: dict[str, Path]) -> str:
    data = {"merge_method": "linear", "dtype": "float32"}
    if case["base"]:
        data["base_model"] = str(z[case["base"]])
    data["models"] = [{"model": str(z[k]), "parameters": {"weight": w}} for k, w in case["models"].items()]
    data.update(case["top"])
    return yaml.safe_dump(data, sort_keys=False)


def _build(case: dict, z: dict[str, Path]) -> Vocabulary:
    keys = list(case["models"])
    top = case["top"]
    tok = top.get("tokenizer") or {}
    source = top.get("tokenizer_source") or tok.get("source", "union")
    return build_vocabulary(
        [z[k] for k in keys], source=source, base=keys.index(case["base"]) if case["base"] else None,
        tokens=tok.get("tokens"), pad_to_multiple_of=tok.get("pad_to_multiple_of"),
        names=[str(z[k]) for k in keys], chat_template=top.get("chat_template"),
    )


@pytest.fixture(scope="module")
def merged(zoo, tmp_path_factory) -> dict[str, tuple[dict, Path, Path, Vocabulary]]:
    """Every case merged by mergekit (one process) and its vocabulary built and saved here."""
    root = tmp_path_factory.mktemp("tokruns")
    cases = _cases(zoo)
    jobs, out = [], {}
    for name, case in cases.items():
        recipe = root / f"{name}.yml"
        recipe.write_text(_recipe_yaml(case, zoo))
        jobs.append((recipe, root / f"mk-{name}"))
    tm.run_mergekit(jobs, cwd=root)
    for name, case in cases.items():
        vocab = _build(case, zoo)
        mine = root / f"jm-{name}"
        mine.mkdir()
        vocab.save(mine)
        out[name] = (case, root / f"mk-{name}", mine, vocab)
    return out


# ---------------------------------------------------------------------------------------------
# Against mergekit


def _vocab(directory: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory).get_vocab()


def _added(directory: Path) -> dict[str, tuple]:
    spec = json.loads((directory / "tokenizer.json").read_text())
    return {t["content"]: tuple(sorted((k, v) for k, v in t.items() if k != "id")) for t in spec["added_tokens"]}


CASES = ["union_base", "union_nobase", "base_source", "model_source", "tokens", "tokens_union", "base_padded_tokens",
         "bpe_strip", "union_padded_base"]
# Cases whose every token id mergekit fixes (no set or hash-map order in play): the files must match exactly.
EXACT = {"base_source", "model_source", "tokens", "base_padded_tokens", "bpe_strip"}


@pytest.mark.parametrize("name", CASES)
def test_vocabulary_matches_mergekit(merged, name):
    case, mk, mine, vocab = merged[name]
    theirs, ours = _vocab(mk), _vocab(mine)
    assert set(ours) == set(theirs)
    assert sorted(ours.values()) == list(range(len(ours))) == sorted(theirs.values())
    assert ours == {t: i for i, t in enumerate(vocab.tokens)}
    if case["base"] is not None:  # without one, mergekit's base tokenizer is any model (Python's set order)
        assert _added(mine) == _added(mk)
    config = json.loads((mk / "config.json").read_text())
    assert vocab.size == config["vocab_size"]
    if case["base"] is not None and name.startswith("union"):  # the base's tokens keep their ids
        for t in _vocab(vocab.models[list(case["models"]).index(case["base"])]):
            assert ours[t] == theirs[t]
    if name in EXACT:
        assert ours == theirs
        assert json.loads((mine / "tokenizer.json").read_text()) == json.loads((mk / "tokenizer.json").read_text())
        # local_files_only records how transformers loaded the source (mergekit ran with HF_HUB_OFFLINE=1)
        ours_cfg, theirs_cfg = (json.loads((d / "tokenizer_config.json").read_text()) for d in (mine, mk))
        assert ours_cfg.pop("local_files_only", None) is not None and theirs_cfg.pop("local_files_only", None) is not None
        assert ours_cfg == theirs_cfg


@pytest.mark.parametrize("name", CASES)
def test_aligned_rows_merge_like_mergekit(merged, name):
    case, mk, _, vocab = merged[name]
    weights = np.array(list(case["models"].values()), np.float32)
    theirs_vocab = _vocab(mk)
    plan = vocab.plan()
    result = tm.read_dir(mk)
    for tensor in VOCAB_TENSORS:
        arrays = [tm.read_dir(d)[tensor] for d in vocab.models]
        aligned = plan.align(arrays)
        assert all(a.shape == (vocab.size, 32) and a.dtype == np.float32 for a in aligned)
        ours = np.tensordot(weights, np.stack(aligned), axes=1) / weights.sum()
        theirs = result[tensor]
        assert theirs.shape == ours.shape
        order = [theirs_vocab[t] for t in vocab.tokens]
        np.testing.assert_allclose(ours[: vocab.n_tokens], theirs[order], **TOL, err_msg=f"{name} {tensor}")
        np.testing.assert_allclose(ours[vocab.n_tokens:], theirs[vocab.n_tokens:], **TOL)


def test_rules_in_the_cases(merged, zoo):
    """What the cases exercise, spelled out: which rows come from where."""
    _, _, _, vocab = merged["union_base"]
    plan = vocab.plan()
    base, chat, chat2, other = plan.rows
    i = vocab.tokens.index
    assert vocab.size == vocab.n_tokens == 140
    # w5 missing in `other`: the base's row
    assert other.gather[i("w5")] == -1 and plan.defaults[other.fill[i("w5")]].terms == ((0, 5),)
    # v3 only in `other`: its row for everyone
    assert plan.defaults[base.fill[i("v3")]].terms == ((3, 6),)
    # ChatML in chat and chat2, not in the base: their mean
    assert plan.defaults[base.fill[i("<|im_end|>")]].terms == ((1, 129), (2, 129))
    assert chat.gather[i("<|im_end|>")] == 129 and chat2.fill[i("<|im_end|>")] == -1

    _, _, _, vocab = merged["tokens"]
    plan = vocab.plan()
    assert (vocab.n_tokens, vocab.size) == (131, 144)
    for row in plan.rows:  # forced: no model keeps its own w20 / w9
        assert row.gather[vocab.tokens.index("w20")] == -1 and row.gather[vocab.tokens.index("w9")] == -1


def test_chat_template_files(merged):
    """The named template renders as mergekit's; literal Jinja is written as given."""
    from transformers import AutoTokenizer

    conversation = [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": " Hi\n"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    for name in ("union_base", "union_nobase", "base_source"):
        _, mk, mine, _ = merged[name]
        a, b = AutoTokenizer.from_pretrained(mk), AutoTokenizer.from_pretrained(mine)
        assert a.chat_template and b.chat_template
        for gen in (False, True):
            assert b.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen) == \
                a.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
        # the same tokenizer files (chat_template.jinja, or tokenizer_config.json's key, as transformers saves it)
        assert {p.name for p in mine.iterdir()} == {p.name for p in mk.iterdir() if p.name.startswith(TOKENIZER_FILES)}
    _, mk, mine, _ = merged["base_source"]
    assert (mine / "chat_template.jinja").read_text() == (mk / "chat_template.jinja").read_text() == LITERAL


CONVERSATIONS = [
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": " Hi there\n"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Yo \n"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S1"}, {"role": "user", "content": "Hi"},
     {"role": "user_context", "content": "ctx"}, {"role": "system", "content": " S2 "}],
]


@pytest.mark.parametrize("name", ["alpaca", "chatml", "exaone", "llama3", "mistral"])
def test_named_templates_render_as_mergekit(zoo, name):
    """jaxmerge's own template texts render every conversation as mergekit's do (errors included)."""
    from mergekit._data import chat_templates
    from transformers import AutoTokenizer

    assert name in TEMPLATE_NAMES
    theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
    ours = resolve_chat_template(name)
    assert ours == (CHAT_TEMPLATE_DIR / f"{name}.jinja").read_text()
    tok = AutoTokenizer.from_pretrained(zoo["base"])

    def render(template, conversation, gen):
        tok.chat_template = template
        try:
            return tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
        except Exception as err:  # mistral refuses some conversations: both must
            return type(err).__name__

    for conversation in CONVERSATIONS:
        for gen in (False, True):
            assert render(ours, conversation, gen) == render(theirs, conversation, gen)


# ---------------------------------------------------------------------------------------------
# Errors and the pieces alone


def test_errors(zoo):
    models = [zoo["base"], zoo["chat"]]
    names = [str(m) for m in models]
    vocab = build_vocabulary(models, base=0, names=names, tokens={"<|im_start|>": {"source": names[0], "force": False}})
    with pytest.raises(CheckpointError, match=r"tokenizer.tokens\['<\|im_start\|>'\].source: .*base has no token"):
        vocab.plan()
    other_token = {"kind": "model_token", "model": names[1], "token": "nope"}
    vocab = build_vocabulary(models, base=0, names=names, tokens={"<|x|>": {"source": other_token}})
    with pytest.raises(CheckpointError, match=r"source.token: .* has no token 'nope'"):
        vocab.plan()
    vocab = build_vocabulary(models, base=0, names=names, tokens={"<|x|>": {"source": None}})
    with pytest.raises(CheckpointError, match="needs a source"):
        vocab.plan()
    with pytest.raises(CheckpointError, match="chat_template: 'chatml2' is neither a template name"):
        build_vocabulary(models, base=0, chat_template="chatml2", where="r.yml")
    with pytest.raises(CheckpointError, match="chat_template"):
        resolve_chat_template("{{ short }}")  # Jinja under 20 characters: mergekit refuses it too
    with pytest.raises(CheckpointError, match=r"r.yml: tokenizer_source: .*notok: .* has no tokenizer files"):
        build_vocabulary(models, source=str(zoo["notok"]), where="r.yml", source_key="tokenizer_source")
    # Tokens past the base's vocab_size can only be dropped from a BPE tokenizer (mergekit's RuntimeError).
    small = zoo["notok"].parent / "small"
    small.mkdir(exist_ok=True)
    config = json.loads((zoo["base"] / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 120}))
    tm.save_tokenizer(small)
    with pytest.raises(CheckpointError, match="r.yml: base_model: .*beyond vocab_size 120 and is WordLevel"):
        build_vocabulary([small, zoo["base"]], base=0, where="r.yml")
    # A model without a tokenizer is taken to share the base's vocabulary (mergekit's assumption).
    vocab = build_vocabulary([zoo["base"], zoo["notok"]], base=0)
    np.testing.assert_array_equal(vocab.index[1], vocab.index[0])


@pytest.mark.parametrize("tokens", [
    {"<|new|>": {"source": {"kind": "zero"}}},  # source: base + a new token past the base's rows
    {"<|im_start|>": {"source": "BASE"}},  # a source model that lacks the token
])
def test_mergekit_fails_where_jaxmerge_refuses(zoo, tmp_path, tokens):
    """Recipes mergekit 0.1.5 cannot run: jaxmerge refuses them (one line naming the key) before any tensor."""
    tokens = {k: {"source": str(zoo["base"]) if v["source"] == "BASE" else v["source"]} for k, v in tokens.items()}
    case = dict(models={"base": 0.5, "chat": 0.5}, base="base", top={"tokenizer": {"source": "base", "tokens": tokens}})
    recipe = tmp_path / "r.yml"
    recipe.write_text(_recipe_yaml(case, zoo))
    with pytest.raises(RuntimeError, match="KeyError|AssertionError"):
        tm.run_mergekit([(recipe, tmp_path / "out")], cwd=tmp_path)
    vocab = _build(case, zoo)
    with pytest.raises(CheckpointError) as err:
        vocab.plan()
    assert "\n" not in str(err.value) and ("tokenizer.tokens" in str(err.value) or "vocab_size" in str(err.value))


def test_align_rows_axes_and_dtypes():
    """Rows gathered, defaults filled, padding the mean; any vocabulary axis; dtype kept, computed in float32."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 3)).astype(np.float32)
    b = rng.standard_normal((4, 3)).astype(np.float32)
    from jaxmerge.recipes.tokenizer import DefaultRow

    plan = GroupPlan(
        members=(0, 1),
        rows=(
            RowPlan(gather=np.array([0, 4, -1, -1]), fill=np.array([-1, -1, 0, 1]), size=6),
            RowPlan(gather=np.array([3, -1, 1, -1]), fill=np.array([-1, 2, -1, 1]), size=6),
        ),
        defaults=(DefaultRow("x", ((1, 1),), "x"), DefaultRow("z", (), "z"), DefaultRow("m", ((0, 2), (1, 0)), "m")),
    )
    out_a, out_b = plan.align([a, b])
    expect_a = np.stack([a[0], a[4], b[1], np.zeros(3)])
    expect_b = np.stack([b[3], (a[2] + b[0]) / 2, b[1], np.zeros(3)])
    for out, expect in ((out_a, expect_a), (out_b, expect_b)):
        np.testing.assert_allclose(out[:4], expect, rtol=1e-6)
        np.testing.assert_allclose(out[4:], np.broadcast_to(expect.mean(0), (2, 3)), rtol=1e-6)
    at_axis1 = plan.align([a.T, b.T], vocabulary_axis=1)
    np.testing.assert_array_equal(at_axis1[0], out_a.T)
    import ml_dtypes

    half = align_rows(a.astype(ml_dtypes.bfloat16), plan.rows[0], defaults=plan.default_rows([a, b]))
    assert half.dtype == ml_dtypes.bfloat16 and half.shape == (6, 3)
    with pytest.raises(ValueError, match="defaults"):
        align_rows(a, plan.rows[0])


# ---------------------------------------------------------------------------------------------
# End to end: `jaxmerge merge` on the same recipes


@pytest.mark.parametrize("name", CASES)
def test_jaxmerge_merge_equals_mergekit(merged, name, tmp_path):
    """The whole merge through the engine (rows aligned as read, then merged): every tensor equals mergekit's,
    vocabulary rows matched by token (mergekit's union order varies from run to run), padding rows too."""
    from jaxmerge.cli import main

    _, mk, _, vocab = merged[name]
    out = tmp_path / "out"
    assert main(["merge", str(mk.parent / f"{name}.yml"), "--output", str(out), "--quiet"]) == 0
    ours_vocab, theirs_vocab = _vocab(out), _vocab(mk)
    assert set(ours_vocab) == set(theirs_vocab)
    ours, theirs = tm.read_dir(out), tm.read_dir(mk)
    assert sorted(ours) == sorted(theirs)
    tokens = sorted(theirs_vocab)
    for tensor in theirs:
        a, b = ours[tensor], theirs[tensor]
        assert a.shape == b.shape, tensor
        if tensor in VOCAB_TENSORS:
            rows_a, rows_b = [ours_vocab[t] for t in tokens], [theirs_vocab[t] for t in tokens]
            np.testing.assert_allclose(a[rows_a], b[rows_b], **TOL, err_msg=f"{name} {tensor}")
            np.testing.assert_allclose(a[vocab.n_tokens:], b[vocab.n_tokens:], **TOL, err_msg=f"{name} {tensor} padding")
        else:
            np.testing.assert_allclose(a, b, **TOL, err_msg=f"{name} {tensor}")
    config_ours, config_theirs = (json.loads((d / "config.json").read_text()) for d in (out, mk))
    assert config_ours["vocab_size"] == config_theirs["vocab_size"] == vocab.size
    # Loaded with transformers: mergekit's logits, token for token (by id where mergekit fixes the ids,
    # else each output token's logit looked up by the token it stands for).
    tokens = [t for t in sorted(theirs_vocab, key=theirs_vocab.get) if not t.startswith("<|")][:12]
    ours_logits = tm.logits(out, np.array([[ours_vocab[t] for t in tokens]]))
    theirs_logits = tm.logits(mk, np.array([[theirs_vocab[t] for t in tokens]]))
    columns = sorted(theirs_vocab)
    np.testing.assert_allclose(ours_logits[..., [ours_vocab[t] for t in columns]],
                               theirs_logits[..., [theirs_vocab[t] for t in columns]], rtol=1e-4, atol=1e-5)
