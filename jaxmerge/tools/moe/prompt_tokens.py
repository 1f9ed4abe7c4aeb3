"""The experts' prompts as token ids, tokenised as mergekit-moe does, in a child process that overlaps the build.

mergekit-moe tokenises the prompts with the base model's `AutoTokenizer`. Importing
transformers costs seconds (4-5 s on a 2-core machine, most of it torch, which
tokenising never uses), several times what building a small mixture costs. So
`PromptTokens` starts a child Python process at once; it imports transformers
with torch hidden (about half the import) and tokenises while the parent copies
the experts, and the parent reads the ids when it writes the routers. Should the
child fail (torch needed after all, transformers reachable only through the
parent's `sys.path`, a broken tokenizer), the parent tokenises in process, which
gives the same ids or one line saying what failed (`PromptTokenError`); a child
stopped by SIGINT or SIGTERM (which reached it with the parent) is not retried.

This file runs as that child (`python -I prompt_tokens.py`: isolated, so neither
the working directory nor this folder shadows a module): it imports nothing of
jaxmerge, hence no JAX. The request is a JSON file named by its argument, the answer JSON on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import numpy as np


def load_tokenizer(directory: str | Path):
    """The tokenizer of the model in `directory`, set up as mergekit's (left padding, pad = BOS, else EOS).

    Raises:
      ImportError: no transformers. Whatever transformers raises for a missing or broken tokenizer.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize(tokenizer, prompts, tensors: str | None = "np"):
    """mergekit's `tokenize_prompts`: the BOS token prepended as text, no other special tokens, padded.

    Returns:
      (input_ids, attention_mask), (prompts, longest) each, as `tensors` ("np", "pt", None: lists).
    """
    batch = tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors=tensors, padding=True,
                      add_special_tokens=False)
    return batch["input_ids"], batch["attention_mask"]


class PromptTokenError(Exception):
    """The prompts could not be tokenised (one line: what failed and transformers' reason)."""


def one_line(what: str, err: BaseException) -> str:
    """`what (ErrorType: message)`, cut at the first line break."""
    return f"{what} ({type(err).__name__}: {err})".split("\n")[0]


def tokenize_here(directory: str | Path, prompt_lists: list[list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """`PromptTokens.result` computed in this process.

    Raises:
      PromptTokenError: no tokenizer in `directory`, or the prompts cannot be tokenised with it.
    """
    try:
        tokenizer = load_tokenizer(directory)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a missing or broken tokenizer
        raise PromptTokenError(one_line("no tokenizer for the experts' prompts", err)) from None
    try:
        return [tokenize(tokenizer, prompts) for prompts in prompt_lists]
    except Exception as err:  # noqa: BLE001 - likewise for what a tokenizer refuses
        raise PromptTokenError(one_line("cannot tokenise the experts' prompts", err)) from None


class PromptTokens:
    """Token ids of several prompt lists, computed by a child process started by the constructor.

    Args:
      directory: the model directory whose tokenizer mergekit would load (the base model).
      prompt_lists: the prompt lists to tokenise, each one batch.
    """

    def __init__(self, directory: str | Path, prompt_lists: list[list[str]]):
        self.directory = Path(directory)
        self.prompt_lists = [list(p) for p in prompt_lists]
        self._answer: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._child = None
        # The request travels in a private temporary file, which the child removes once read.
        fd, request = tempfile.mkstemp(prefix="jaxmerge-prompts-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"directory": str(self.directory), "prompts": self.prompt_lists}, f)
            self._child = subprocess.Popen([sys.executable, "-I", __file__, request], stdin=subprocess.DEVNULL,
                                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except (OSError, ValueError, TypeError):  # no child for us: `result` tokenises in this process
            Path(request).unlink(missing_ok=True)
            return
        # Dropped without `close` (a failed plan's caller): the child is stopped and the request removed.
        self._finalizer = weakref.finalize(self, _stop, self._child, request)

    def result(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(input_ids, attention_mask) of each prompt list, as NumPy arrays; waits for the child.

        Raises:
          PromptTokenError: the child was interrupted (SIGINT, SIGTERM), or it failed and tokenising
            here fails too.
        """
        if self._answer is None:
            self._answer = self._from_child()
            if self._answer is None:
                self._answer = tokenize_here(self.directory, self.prompt_lists)
        return self._answer

    def close(self) -> None:
        """Stop the child if it still runs (the build failed before it needed the ids); remove its request."""
        if self._child is not None:
            self._finalizer()
            self._child = None

    def _from_child(self):
        if self._child is None:
            return None
        child, self._child = self._child, None
        try:
            out, _ = child.communicate()
        finally:
            self._finalizer()
        if child.returncode in (-signal.SIGINT, -signal.SIGTERM):  # interrupted with us: no second try
            raise PromptTokenError(f"the prompts' tokenizer process was stopped by signal {-child.returncode}")
        if child.returncode != 0:
            return None  # any other failure: tokenised here, which gives the ids or the error it always gave
        try:
            batches = json.loads(out)
            return [(np.asarray(ids, np.int64).reshape(len(p), -1), np.asarray(mask, np.int64).reshape(len(p), -1))
                    for (ids, mask), p in zip(batches, self.prompt_lists, strict=True)]
        except (ValueError, TypeError):
            return None


def _stop(child: subprocess.Popen, request: str) -> None:
    if child.poll() is None:
        child.kill()
    child.wait()
    if child.stdout is not None:
        child.stdout.close()
    Path(request).unlink(missing_ok=True)


def _child_main(request_file: str) -> None:
    """Tokenise the request {"directory", "prompts"} read from `request_file`; write
    [[input_ids, attention_mask], ...] on stdout."""
    # Tokenising never touches torch, and transformers imports it whenever it is installed (about half of
    # the import time): hidden, the import takes ~2 s instead of ~4.6 s on the 2-core benchmark machine.
    sys.modules["torch"] = None
    import logging

    logging.disable(logging.WARNING)  # transformers' note that torch is missing
    request = json.loads(Path(request_file).read_text())
    Path(request_file).unlink(missing_ok=True)
    tokenizer = load_tokenizer(request["directory"])
    answer = [list(tokenize(tokenizer, prompts, tensors=None)) for prompts in request["prompts"]]
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    _child_main(sys.argv[1])
