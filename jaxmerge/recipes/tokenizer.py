"""The output vocabulary of a recipe, and each model's vocabulary rows aligned to it, as mergekit 0.1.5.

A recipe with `tokenizer_source: union | base | <model>` or `tokenizer: {source,
tokens, pad_to_multiple_of}` gets a new tokenizer, and every tensor with a
vocabulary axis (embeddings, LM heads) of every model is re-indexed to it before
the merge. This module is the front end of that: `build_vocabulary` builds the
output tokenizer and each model's map from output tokens to its own rows,
`Vocabulary.plan` says how the rows of one tensor's sources are filled
(`GroupPlan`), and `align_rows` / `GroupPlan.align` apply it with NumPy.

The rules, as mergekit 0.1.5 has them (mergekit/tokenizer/build.py, embed.py):

* The base tokenizer is the base model's (the first model's when the recipe
  has no base_model), stripped of tokens whose id is >= the model's
  config vocab_size (BPE tokenizers only; any other kind is an error then).
  `base` outputs it; `<model>` outputs that model's tokenizer unchanged;
  `union` outputs the base tokenizer plus every other token of every model
  whose id is below that model's vocab_size: plain tokens first (added as
  normal added tokens), then the models' added tokens (special or not, with
  the settings of the first model that has them). The keys of `tokens:` not
  yet in the vocabulary are added last. A model without a tokenizer is taken
  to share the base's. With `base`, the output tokenizer is the base's own, so
  the tokens `tokens:` adds count as the base's, at ids past its rows unless
  its embedding is padded (then its padding rows are read for them); past its
  rows, mergekit fails (KeyError) and so does `Vocabulary.plan`.
* A model has a token when its tokenizer has it at an id below its
  config vocab_size. Its row for an output token is its own row unless it
  lacks the token or the token's entry in `tokens:` says `force: true`; then
  the row is the token's default, the same for every model of the tensor:
  - the entry's `source`: a model's row of that token (the model must have it),
    `{kind: zero}`, or `{kind: model_token, model, token | token_id}` (that
    model's row of another token, by its own tokenizer or row number);
  - without an entry: the row of the one model that has the token; zero when no
    model has it; the base model's row when the tensor's sources include the
    base and it has the token; else the mean of the rows of the models that
    have it.
  An entry's source is only read when a default is needed (some model lacks
  the token, or force).
* The merge then runs on the aligned tensors with the recipe's weights
  unchanged: a model lacking a token takes part in that row's merge with the
  default row (so with `linear` a token only one model has comes out as that
  model's row, whatever the weights).
* `pad_to_multiple_of: N` rounds the row count up to a multiple of N; each
  model's padding rows are the mean of its aligned rows (before merging).
* Row order in mergekit's union depends on Python's set order and the Rust
  tokenizer's hash-map order (it varies between runs for tokens the base
  lacks); jaxmerge takes models in recipe order (base first) and each model's
  tokens by id, so the same tokens get the same rows every run. The token
  set, the rows' values per token and the padding are mergekit's.

transformers (and tokenizers) build and save the tokenizer, as in mergekit:
they are needed for recipes with a tokenizer source or a chat template, and
imported only then.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxmerge.formats.safetensors_io import CheckpointError

CHAT_TEMPLATE_DIR = Path(__file__).parent / "chat_templates"
TEMPLATE_NAMES = tuple(sorted(p.stem for p in CHAT_TEMPLATE_DIR.glob("*.jinja")))
# Files whose presence means a directory carries a tokenizer (transformers reads one of these).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model")

# index values: a model's own row, or one of these.
MISSING = -1  # the model's tokenizer lacks the token
OUT_OF_RANGE = -2  # it has it at an id >= the model's vocab_size (mergekit fails on such a token)


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class TokenRule:
    """One entry of the recipe's `tokenizer.tokens`.

    kind: "model" (that model's row of this token), "zero", "model_token" (that
    model's row of `token` or of row `token_id`), or None (no source given).
    """

    token: str
    kind: str | None
    model: str | None = None  # the recipe's reference to the source model
    token_id: int | None = None
    source_token: str | None = None
    force: bool = False
    where: str = "tokenizer.tokens"


@dataclass(frozen=True)
class DefaultRow:
    """The row a token gets in models that lack it (or in all models when forced).

    terms: (position in the tensor's sources, row of that source) pairs whose mean
    is the row; empty for a zero row.
    """

    token: str
    terms: tuple[tuple[int, int], ...]
    where: str


@dataclass(frozen=True)
class RowPlan:
    """How one model's vocabulary tensor becomes the output vocabulary's rows.

    gather: (n_tokens,) int64, the model's own row for each output token, -1 where
      the row is a default instead.
    fill: (n_tokens,) int64, where gather is -1: the index of the token's default in
      `GroupPlan.defaults` (-1: a zero row); -1 elsewhere.
    size: the output row count, padding included; rows n_tokens..size-1 are the
      mean of rows 0..n_tokens-1.
    """

    gather: np.ndarray
    fill: np.ndarray
    size: int


@dataclass(frozen=True)
class GroupPlan:
    """The alignment of one output tensor's sources (models in the tensor's order)."""

    members: tuple[int, ...]  # model indices (into Vocabulary.models)
    rows: tuple[RowPlan, ...]  # one per member
    defaults: tuple[DefaultRow, ...]

    def default_rows(self, arrays: Sequence[np.ndarray], vocabulary_axis: int = 0) -> np.ndarray:
        """The defaults' values for one tensor, float32.

        Args:
          arrays: the members' tensors, in `members` order.
          vocabulary_axis: the vocabulary axis of the tensors.

        Returns:
          (len(defaults), *other dims) float32.
        """
        views = _views(arrays, vocabulary_axis, len(self.members))
        out = np.zeros((len(self.defaults), *views[0].shape[1:]), np.float32)
        for k, default in enumerate(self.defaults):
            if not default.terms:
                continue
            for pos, row in default.terms:
                if not 0 <= row < views[pos].shape[0]:
                    raise CheckpointError(
                        f"{default.where}: row {row} is out of range for a tensor of {views[pos].shape[0]} rows"
                    )
                out[k] += views[pos][row].astype(np.float32)
            out[k] /= len(default.terms)
        return out

    def align(self, arrays: Sequence[np.ndarray], vocabulary_axis: int = 0) -> list[np.ndarray]:
        """Every member's tensor aligned to the output vocabulary (each in its own dtype).

        Args:
          arrays: the members' tensors, in `members` order.
          vocabulary_axis: the vocabulary axis of the tensors.

        Returns:
          The aligned tensors, vocabulary axis of length `rows[i].size`.
        """
        defaults = self.default_rows(arrays, vocabulary_axis) if self.defaults else None
        return [align_rows(a, plan, vocabulary_axis, defaults=defaults) for a, plan in zip(arrays, self.rows)]


@dataclass
class Vocabulary:
    """The output vocabulary of a recipe and every model's rows of it (see `build_vocabulary`)."""

    tokenizer: Any  # the transformers tokenizer that `save` writes
    tokens: tuple[str, ...]  # the output tokens by id
    size: int  # the output row count (padding included): the output config's vocab_size
    models: tuple[Path, ...]
    names: tuple[str, ...]  # the recipe's reference to each model
    index: tuple[np.ndarray, ...]  # per model, (n_tokens,) int64: own row, MISSING or OUT_OF_RANGE
    base: int | None  # the recipe's base_model (index into models)
    rules: dict[str, TokenRule] = field(default_factory=dict)
    original_vocabs: tuple[dict[str, int], ...] = ()  # each model's tokenizer vocabulary
    vocab_sizes: tuple[int, ...] = ()  # each model's config vocab_size (its tokenizer's size without one)
    chat_template: str | None = None
    where: str = "recipe"

    @property
    def n_tokens(self) -> int:
        """The number of tokens (rows before padding)."""
        return len(self.tokens)

    def save(self, out_dir: Path | str) -> None:
        """Write the tokenizer files (and the chat template, if any) into `out_dir`, as mergekit does."""
        if self.chat_template:
            self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(str(out_dir))

    def plan(self, members: Sequence[int] | None = None, base: int | None | str = "recipe") -> GroupPlan:
        """How the rows of one tensor's sources are aligned.

        Args:
          members: the indices (into `models`) of the tensor's sources, in their
            order (default: all models, in order).
          base: the tensor's base model index (a slice's own base_model), None for
            none; default: the recipe's base_model.

        Returns:
          A GroupPlan. Raises CheckpointError where mergekit fails: a source with a
          token beyond its vocab_size, a `tokens:` entry without a source or whose
          source lacks the token or is not among the members.
        """
        members = tuple(range(len(self.models))) if members is None else tuple(members)
        base = self.base if base == "recipe" else base
        n = self.n_tokens
        table = np.stack([self.index[m] for m in members]) if members else np.zeros((0, n), np.int64)
        for pos, m in enumerate(members):
            bad = np.nonzero(table[pos] == OUT_OF_RANGE)[0]
            if bad.size:
                token = self.tokens[bad[0]]
                raise CheckpointError(
                    f"{self.where}: {self.names[m]} has token {token!r} at id {self.original_vocabs[m][token]}, beyond "
                    f"its vocab_size {self.vocab_sizes[m]}: mergekit 0.1.5 fails on this too (with source: base, "
                    "tokens added by tokenizer.tokens count as the base's; use source: union)"
                )
        present = table >= 0
        forced = np.zeros(n, bool)
        for token, rule in self.rules.items():
            if rule.force:
                forced[self._id(token)] = True
        base_pos = members.index(base) if base in members else None
        defaults: list[DefaultRow] = []
        default_of = np.full(n, -1, np.int64)
        for i in np.nonzero(forced | ~present.all(axis=0))[0]:
            token = self.tokens[i]
            rule = self.rules.get(token)
            if rule is not None:
                terms = self._rule_terms(rule, i, members, table)
                where = rule.where
            else:
                have = np.nonzero(present[:, i])[0]
                if len(have) == 1:  # the one model that has it
                    terms = ((int(have[0]), int(table[have[0], i])),)
                elif len(have) == 0:  # nobody: zero
                    terms = ()
                elif base_pos is not None and present[base_pos, i]:
                    terms = ((base_pos, int(table[base_pos, i])),)
                else:  # the mean of those that have it
                    terms = tuple((int(p), int(table[p, i])) for p in have)
                where = f"{self.where}: token {token!r}"
            default_of[i] = len(defaults)
            defaults.append(DefaultRow(token, terms, where))
        rows = []
        for pos in range(len(members)):
            gather = np.where(present[pos] & ~forced, table[pos], -1).astype(np.int64)
            fill = np.where(gather < 0, default_of, -1).astype(np.int64)
            rows.append(RowPlan(gather=gather, fill=fill, size=self.size))
        return GroupPlan(members=members, rows=tuple(rows), defaults=tuple(defaults))

    def __post_init__(self):
        self._ids = {t: i for i, t in enumerate(self.tokens)}

    def _id(self, token: str) -> int:
        return self._ids[token]

    def _rule_terms(self, rule: TokenRule, i: int, members: tuple[int, ...], table: np.ndarray):
        """A `tokens:` entry's default row as (position, row) terms."""
        if rule.kind == "zero":
            return ()
        if rule.kind is None:
            raise CheckpointError(
                f"{rule.where}: {rule.token!r} is forced or missing in some models, so it needs a source (mergekit fails too)"
            )
        model = self.model_index(rule.model)
        if model is None or model not in members:
            raise CheckpointError(
                f"{rule.where}.source: {rule.model} is not among the models merged into this tensor"
            )
        pos = members.index(model)
        if rule.kind == "model":
            if table[pos, i] < 0:
                raise CheckpointError(f"{rule.where}.source: {rule.model} has no token {rule.token!r}")
            return ((pos, int(table[pos, i])),)
        if rule.token_id is not None:
            if rule.token_id < 0:
                raise CheckpointError(f"{rule.where}.source.token_id: {rule.token_id} is negative")
            return ((pos, rule.token_id),)
        vocab = self.original_vocabs[model]
        if rule.source_token not in vocab:
            raise CheckpointError(f"{rule.where}.source.token: {rule.model} has no token {rule.source_token!r}")
        return ((pos, vocab[rule.source_token]),)

    def model_index(self, ref: str | Path | None) -> int | None:
        """The index of the model a recipe reference (or path) names, or None."""
        if ref is None:
            return None
        for i, name in enumerate(self.names):
            if str(ref) == name:
                return i
        for i, path in enumerate(self.models):
            if str(ref) == str(path) or _same_path(Path(ref), path):
                return i
        return None


# ---------------------------------------------------------------------------------------------
# Applying a plan


def align_rows(
    array: np.ndarray,
    row_plan: RowPlan,
    vocabulary_axis: int = 0,
    *,
    defaults: np.ndarray | None = None,
    dtype: Any = None,
) -> np.ndarray:
    """One model's vocabulary tensor aligned to the output vocabulary.

    Args:
      array: the tensor (an embedding or LM head), any float dtype.
      row_plan: the model's RowPlan (from `Vocabulary.plan`).
      vocabulary_axis: the tensor's vocabulary axis.
      defaults: `GroupPlan.default_rows` of the tensor's sources; needed when the
        plan has rows that are defaults (fill >= 0).
      dtype: the output dtype (default: the input's). Computed in float32.

    Returns:
      The aligned tensor: the vocabulary axis has `row_plan.size` rows.
    """
    x = np.moveaxis(np.asarray(array), vocabulary_axis, 0)
    gather, fill = row_plan.gather, row_plan.fill
    n = len(gather)
    own = gather >= 0
    if own.any() and gather.max() >= x.shape[0]:
        raise CheckpointError(
            f"a vocabulary tensor of {x.shape[0]} rows has no row {int(gather.max())} (its config's vocab_size is larger)"
        )
    out = np.zeros((row_plan.size, *x.shape[1:]), np.float32)
    out[:n][own] = x[gather[own]]
    filled = ~own & (fill >= 0)
    if filled.any():
        if defaults is None:
            raise ValueError("this row plan has default rows: pass defaults=GroupPlan.default_rows(...)")
        out[:n][filled] = defaults[fill[filled]]
    if row_plan.size > n:  # padding rows: the mean of the real ones
        out[n:] = out[:n].mean(axis=0)
    return np.moveaxis(out, 0, vocabulary_axis).astype(dtype or x.dtype)


def _views(arrays: Sequence[np.ndarray], axis: int, count: int) -> list[np.ndarray]:
    if len(arrays) != count:
        raise ValueError(f"expected {count} tensors (one per source), got {len(arrays)}")
    views = [np.moveaxis(np.asarray(a), axis, 0) for a in arrays]
    if any(v.shape[1:] != views[0].shape[1:] for v in views):
        raise CheckpointError(f"vocabulary tensors differ off the vocabulary axis: {[np.shape(a) for a in arrays]}")
    return views


# ---------------------------------------------------------------------------------------------
# Building


def build_vocabulary(
    models: Sequence[Path],
    *,
    source: str | Path = "union",
    base: int | None = None,
    tokens: Mapping[str, Any] | None = None,
    pad_to_multiple_of: int | None = None,
    names: Sequence[str] | None = None,
    chat_template: str | None = None,
    where: str = "recipe",
    source_key: str = "tokenizer.source",
) -> Vocabulary:
    """The output tokenizer of a recipe and each model's rows of it, as mergekit 0.1.5 builds them.

    Args:
      models: every model directory of the recipe, in recipe order (the base included).
      source: "union", "base", or the tokenizer source model (a recipe reference in
        `names`, or a directory).
      base: the index of the recipe's base_model in `models`, None without one (the
        base tokenizer is then the first model's).
      tokens: `tokenizer.tokens` as `jaxmerge.recipes.schema` parses it:
        {token: {"source": None | model | {"kind": "zero"} | {"kind": "model_token",
        "model", "token" | "token_id"}, "force": bool}}.
      pad_to_multiple_of: round the row count up to a multiple of this.
      names: the recipe's reference to each model (default: the paths).
      chat_template: a template name, "auto" or Jinja text (`resolve_chat_template`).
      where: the recipe, for messages.
      source_key: how the recipe names the source ("tokenizer_source" or "tokenizer.source").

    Returns:
      A Vocabulary. Raises CheckpointError for a source without a tokenizer, a bad
      chat template, or a tokenizer mergekit cannot strip.
    """
    models = tuple(Path(m) for m in models)
    names = tuple(str(n) for n in names) if names is not None else tuple(str(m) for m in models)
    if not models:
        raise CheckpointError(f"{where}: no models to build a tokenizer from")
    rules = parse_token_rules(tokens, f"{where}: tokenizer.tokens")
    template = resolve_chat_template(chat_template, models, where=f"{where}: chat_template")

    base_dir = models[base if base is not None else 0]
    base_key = "base_model" if base is not None else f"models[0] ({names[0]})"
    base_tok = _strip(_load(base_dir, f"{where}: {base_key}", use_fast=True), base_dir, f"{where}: {base_key}")
    # Every other model's tokenizer; one that cannot be loaded is assumed to be the base's (as mergekit).
    loaded = {}
    for i, directory in enumerate(models):
        if directory == base_dir:
            loaded[i] = base_tok
            continue
        try:
            loaded[i] = _load(directory, names[i])
        except CheckpointError:
            loaded[i] = None

    if source == "base":
        out = base_tok
    elif source == "union":
        order = [i for i, d in enumerate(models) if d == base_dir] + [i for i, d in enumerate(models) if d != base_dir]
        out = _union(base_tok, [(models[i], loaded[i]) for i in order if loaded[i] is not None])
    else:
        k = None
        for i, name in enumerate(names):
            if str(source) == name:
                k = i
        src_dir = models[k] if k is not None else Path(source)
        out = _load(src_dir, f"{where}: {source_key}: {source}")

    new = [t for t in rules if t not in out.get_vocab()]
    if new:  # `tokens:` keys the tokenizer lacks, as plain added tokens
        out.add_tokens(new)

    vocab = out.get_vocab()
    ordered = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        raise CheckpointError(f"{where}: {source_key}: the output tokenizer's ids are not 0..{len(ordered) - 1}")
    token_list = tuple(t for t, _ in ordered)
    size = len(token_list)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of

    # Each model's rows. With source: base the output tokenizer is the base's own object, so the tokens
    # that `tokens:` added are the base's too, at ids past its rows (mergekit shares the object the same way).
    index, originals, limits = [], [], []
    for i, directory in enumerate(models):
        tok = loaded[i] if loaded[i] is not None else base_tok
        own = tok.get_vocab()
        limit = config_vocab_size(directory) or len(own)
        rows = np.array([own.get(t, MISSING) for t in token_list], np.int64)
        rows[rows >= limit] = OUT_OF_RANGE
        index.append(rows)
        originals.append(own)
        limits.append(limit)
    return Vocabulary(
        tokenizer=out, tokens=token_list, size=size, models=models, names=names, index=tuple(index),
        base=base, rules=rules, original_vocabs=tuple(originals), vocab_sizes=tuple(limits),
        chat_template=template, where=where,
    )


def parse_token_rules(tokens: Mapping[str, Any] | None, where: str = "tokenizer.tokens") -> dict[str, TokenRule]:
    """`tokenizer.tokens` entries (as `jaxmerge.recipes.schema` returns them) as TokenRules, in order."""
    rules = {}
    for token, entry in (tokens or {}).items():
        entry = entry or {}
        at = f"{where}[{token!r}]"
        src = entry.get("source")
        force = bool(entry.get("force", False))
        if src is None:
            rules[token] = TokenRule(token, None, force=force, where=at)
        elif isinstance(src, dict) and src.get("kind") == "zero":
            rules[token] = TokenRule(token, "zero", force=force, where=at)
        elif isinstance(src, dict) and src.get("kind") == "model_token":
            rules[token] = TokenRule(
                token, "model_token", model=str(src["model"]), token_id=src.get("token_id"),
                source_token=src.get("token"), force=force, where=at,
            )
        elif isinstance(src, (str, Path)):
            rules[token] = TokenRule(token, "model", model=str(src), force=force, where=at)
        else:
            raise CheckpointError(f"{at}.source must be a model, {{kind: zero}} or {{kind: model_token, ...}}, got {src!r}")
    return rules


def config_vocab_size(directory: Path) -> int | None:
    """A model's vocab_size from its config.json (`text_config.vocab_size` for multimodal configs), or None."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    if isinstance(config.get("vocab_size"), int):
        return config["vocab_size"]
    text = config.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("vocab_size"), int):
        return text["vocab_size"]
    return None


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is installed with the tests
        raise CheckpointError(
            "a tokenizer source or chat template needs transformers (pip install transformers), as mergekit"
        ) from None
    return transformers


def _load(directory: Path, what: str, **kwargs):
    """AutoTokenizer.from_pretrained(directory), or a CheckpointError naming `what`."""
    directory = Path(directory)
    if not directory.is_dir() or not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(f"{what}: {directory} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...)")
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError...
        raise CheckpointError(f"{what}: the tokenizer in {directory} cannot be loaded: {err}") from None


def _strip(tok, directory: Path, what: str):
    """The tokenizer without the tokens at ids >= the model's vocab_size (mergekit's base tokenizer)."""
    limit = config_vocab_size(directory) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= limit}
    if not unused:
        return tok
    import tokenizers

    spec = json.loads(tok._tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise CheckpointError(
            f"{what}: its tokenizer has tokens beyond vocab_size {limit} and is {spec['model']['type']}; "
            "mergekit can only drop them from BPE tokenizers"
        )
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < limit]
    spec["model"]["vocab"] = {t: i for t, i in spec["model"]["vocab"].items() if t not in unused}

    def keep(merge) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused for p in parts)

    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if keep(m)]
    try:  # a dropped token that a kept merge produces makes the tokenizer invalid (mergekit fails too)
        tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as err:
        raise CheckpointError(f"{what}: its tokenizer without the tokens beyond vocab_size {limit} is invalid: {err}") from None
    return tok


def _union(base_tok, others: list[tuple[Path, Any]]):
    """mergekit's union tokenizer: the base's, then every model's other plain tokens, then added tokens."""
    transformers = _transformers()
    # A fresh copy of the base tokenizer (the base's own object stays as it is), saved and reloaded as mergekit.
    with tempfile.TemporaryDirectory() as tmp:
        base_tok.save_pretrained(tmp, legacy_format=False)
        out = transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True)
    base_vocab = base_tok.get_vocab()
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for directory, tok in others:
        limit = config_vocab_size(directory) or tok.vocab_size
        for idx, info in sorted(tok.added_tokens_decoder.items()):
            if idx < limit:
                added.setdefault(info.content, info)  # the first model's settings win
        for t, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < limit:
                plain.setdefault(t, None)
    new_plain = [t for t in plain if t not in added and t not in base_vocab]
    if new_plain:
        out.add_tokens(new_plain)
    if added:
        out.add_tokens(list(added.values()))
    return out


# ---------------------------------------------------------------------------------------------
# Chat templates


def resolve_chat_template(value: str | None, models: Sequence[Path] = (), *, where: str = "chat_template") -> str | None:
    """The Jinja text of a recipe's `chat_template`, by mergekit 0.1.5's rules.

    Args:
      value: None, "auto" (the most common template among the models' tokenizers;
        none if they have none), a name in TEMPLATE_NAMES (short, no newline or
        "{"), or Jinja text (at least 20 characters, with a "{").
      models: the model directories, for "auto".
      where: the recipe key, for messages.

    Returns:
      The template text, or None for no template.
    """
    if not value:
        return None
    if value == "auto":
        found = []
        for directory in models:
            try:
                template = _load(Path(directory), str(directory)).chat_template
            except CheckpointError:
                continue
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value and (CHAT_TEMPLATE_DIR / f"{value}.jinja").is_file():
        return (CHAT_TEMPLATE_DIR / f"{value}.jinja").read_text()
    if len(value) < 20 or "{" not in value:
        raise CheckpointError(
            f"{where}: {value!r} is neither a template name ({', '.join(TEMPLATE_NAMES)}, auto) nor Jinja text"
        )
    return value


def reserialize_tokenizer(directory: Path, out_dir: Path, chat_template: str) -> None:
    """Save a model's tokenizer with a chat template into `out_dir` (mergekit's way when the recipe has a
    chat_template but no tokenizer source: it loads and re-saves the donor's tokenizer).

    Args:
      directory: the donor model (base_model, else the first model).
      out_dir: the output directory.
      chat_template: the template text (`resolve_chat_template`).
    """
    tok = _load(Path(directory), str(directory))
    tok.chat_template = chat_template
    tok.save_pretrained(str(out_dir))
