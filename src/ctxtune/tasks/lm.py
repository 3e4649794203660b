"""Tasks on a pretrained language model's own tokens: short lists of common English words, transformed.

A list is K = 5 distinct words drawn uniformly from `WORDS` (130 common English words; each must be ONE token,
with its leading space, in the tokenizer the task is built with: checked when it is built). After a context,
the model must emit the list transformed:

    copy      the list again                                  fox cat sun red map -> fox cat sun red map
    reverse   the list backwards                              fox cat sun red map -> map red sun cat fox
    permute   the fixed permutation `PERMUTATION` (words 3, 5, 1, 4, 2)
                                                              fox cat sun red map -> sun map fox red cat

Contexts (what comes before the list; the list is always followed by the separator " ->"):

    none      nothing:                        " fox cat sun red map ->"
    told      a written instruction:          "Repeat the words in the same order: fox cat sun red map ->"
    shown     one worked example (another list, always from the train split), then a newline:
                                              " dog sea egg pen hat -> dog sea egg pen hat\\n fox cat sun red map ->"

The completion is the K transformed words (K tokens, each with its leading space); exact match scores all K.
Prompts are built token by token from the encoded pieces (leading special tokens of the tokenizer, if any;
instruction; words; separator; newline), which for SmolLM2 equals encoding the whole text (tested).

Names: "lm_<transform>" (context none), "lm_<transform>_told", "lm_<transform>_shown" (`LM_TASK_NAMES`). The
registered tasks of these names are built on SmolLM2's tokenizer (`LM_SOURCE`) when first looked up: the family
is registered by `ctxtune.train.lm_tasks`, since loading a tokenizer belongs to `ctxtune.hf`, above this layer.
`build_lm_task` builds one on any tokenizer's encoders.

Split (stable, never Python's salted hash): a list is in the test split when sha256 of its words joined by single
spaces ("fox cat sun red map") falls in bucket 0 of 4 (`ctxtune.tasks.user.text_split`, as for text tasks). It
depends on the words only, so a list is in the same split for every transform, context and tokenizer: the
train and test lists of copy and permute are the same sets.

Sampling: K distinct word indices per row from a `torch.Generator` (the first K of a random permutation of the
vocabulary), rejecting rows outside the split; the same generator state gives the same batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ctxtune.errors import ConfigError
from ctxtune.tasks.base import Task
from ctxtune.tasks.split import check_split
from ctxtune.tasks.user import text_split

Encoder = Callable[[str], list[int]]

LM_SOURCE = "smollm2"
"""The model whose tokenizer the registered lm tasks are built on."""

K = 5
"""Words per list."""

WORDS: tuple[str, ...] = tuple("""
apple bird boat book bread bridge car cat chair city cloud coat cow cup desk dog door dream duck egg
eye farm field fire fish flag floor flower food foot forest fox friend garden girl glass gold grass
hand hat heart hill horse house ice island key king lake lamp leaf letter light lion map milk moon
mountain mouse music night nose ocean paper park pen pencil phone piano pig plane plant queen rain
ring river road rock roof room rose salt sand school sea sheep ship shoe sky snow song star stone
street sun table tea tiger town toy train tree truck water wind window wolf wood world black blue
brown green red white yellow big small old new hot cold fast slow happy sad bright dark soft loud
""".split())
"""The vocabulary: 130 common English words, each one token with its leading space in SmolLM2's tokenizer."""

PERMUTATION: tuple[int, ...] = (3, 5, 1, 4, 2)
"""The `permute` transform: output word i is input word PERMUTATION[i] (1-indexed)."""

ORDERS: dict[str, tuple[int, ...]] = {
    "copy": tuple(range(K)),
    "reverse": tuple(reversed(range(K))),
    "permute": tuple(p - 1 for p in PERMUTATION),
}
"""Transform -> the input position (0-indexed) of each output word."""

_ORDINALS = ("first", "second", "third", "fourth", "fifth")
INSTRUCTIONS: dict[str, str] = {
    "copy": "Repeat the words in the same order:",
    "reverse": "Write the words in reverse order:",
    "permute": "Write the " + ", ".join(_ORDINALS[p - 1] for p in PERMUTATION[:-1])
    + f" and {_ORDINALS[PERMUTATION[-1] - 1]} word, in that order:",
}
"""The written instruction of the `told` context, per transform."""

SEPARATOR = " ->"
NEWLINE = "\n"
CONTEXTS = ("none", "told", "shown")
TRANSFORMS = tuple(ORDERS)
LM_TASK_NAMES: tuple[str, ...] = tuple(
    f"lm_{t}" if c == "none" else f"lm_{t}_{c}" for t in TRANSFORMS for c in CONTEXTS
)


def parse_lm_name(name: str) -> tuple[str, str]:
    """(transform, context) of an lm task name ("lm_permute_told" -> ("permute", "told"))."""
    if name not in LM_TASK_NAMES:
        raise ConfigError(f"unknown lm task {name!r}; lm tasks: {', '.join(LM_TASK_NAMES)}")
    parts = name.split("_")
    return parts[1], parts[2] if len(parts) > 2 else "none"


def list_split(words: Sequence[str]) -> str:
    """"train" or "test" for a list of words (module docstring: sha256 of the words joined by spaces)."""
    return text_split(" ".join(words))


def transform_words(words: Sequence[str], transform: str) -> list[str]:
    """The list transformed (pure Python, the definition): copy, reverse or permute."""
    if len(words) != K:
        raise ValueError(f"a list has {K} words, got {len(words)}")
    return [words[i] for i in ORDERS[transform]]


class LMListTask(Task):
    """One transform in one context, on the tokens of one tokenizer (module docstring)."""

    def __init__(self, transform: str, context: str, word_ids: Sequence[int], instruction: Sequence[int],
                 separator: Sequence[int], newline: Sequence[int], lead: Sequence[int] = (), source: str = "") -> None:
        if transform not in ORDERS or context not in CONTEXTS:
            raise ConfigError(f"unknown lm task transform {transform!r} or context {context!r}")
        if len(word_ids) != len(WORDS) or len(set(word_ids)) != len(WORDS):
            raise ConfigError(f"an lm task needs {len(WORDS)} distinct word tokens, got {len(set(word_ids))}")
        self.transform, self.context, self.source = transform, context, source
        self.name = f"lm_{transform}" if context == "none" else f"lm_{transform}_{context}"
        self.words = WORDS
        self.word_ids = torch.tensor(list(word_ids), dtype=torch.int64)  # [V]
        self.order = torch.tensor(ORDERS[transform], dtype=torch.int64)  # [K]
        self.lead, self.instruction = tuple(lead), tuple(instruction)
        self.separator, self.newline = tuple(separator), tuple(newline)
        head = len(self.lead) + (len(self.instruction) if context == "told" else 0)
        shown = 2 * K + len(self.separator) + len(self.newline) if context == "shown" else 0
        self.query_start = head + shown
        """Position of the list's first word in the prompt."""
        self.n_input = self.query_start + K + len(self.separator)
        self.n_output = K
        self.n_values = len(WORDS)
        pieces = [*self.lead, *self.instruction, *self.separator, *self.newline, *word_ids]
        self.d_vocab = 1 + max(pieces)

    def __repr__(self) -> str:
        return f"LMListTask(name={self.name!r}, source={self.source!r})"

    def token_labels(self, tokens: Sequence[int]) -> list[str]:
        """The word of each word token, "->" and "\\n" for the separator and newline, "<s>" for a leading special
        token, the id for the rest (instruction tokens)."""
        names = {**{int(i): "<s>" for i in self.lead},
                 **{int(i): "->" for i in self.separator}, **{int(i): "\\n" for i in self.newline},
                 **{int(i): w for i, w in zip(self.word_ids.tolist(), self.words, strict=True)}}
        return [names.get(int(t), str(int(t))) for t in tokens]

    # ----- text ------------------------------------------------------------------------------------------
    def prompt_text(self, words: Sequence[str], shown: Sequence[str] = ()) -> str:
        """The prompt as text (without the tokenizer's leading special tokens): the same tokens, for reading."""
        query = "".join(" " + w for w in words) + SEPARATOR
        if self.context == "told":
            return INSTRUCTIONS[self.transform] + query
        if self.context == "shown":
            demo = "".join(" " + w for w in shown) + SEPARATOR + self.completion_text(shown)
            return demo + NEWLINE + query
        return query

    def completion_text(self, words: Sequence[str]) -> str:
        """The right completion as text (its K words, each with its leading space)."""
        return "".join(" " + w for w in transform_words(words, self.transform))

    # ----- sampling ----------------------------------------------------------------------------------------
    def sample_lists(self, n: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        """[n, K] int64 word indices (into WORDS): K distinct words per row, every row in `split`."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"number of examples must be a positive integer, got {n!r}")
        check_split(split)
        p_accept = 0.2 if split == "test" else 0.7  # expected 0.25 / 0.75; one pass almost always
        chunks: list[torch.Tensor] = []
        have = 0
        while have < n:
            m = math.ceil((n - have) / p_accept) + 16
            cand = torch.rand(m, len(WORDS), generator=generator).argsort(dim=1)[:, :K]  # [m, K] distinct
            keep = torch.tensor([list_split([WORDS[i] for i in row]) == split for row in cand.tolist()])
            accepted = cand[keep][: n - have]
            chunks.append(accepted)
            have += accepted.shape[0]
        return torch.cat(chunks)  # [n, K]

    def sample_inputs(self, n: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        """[n, n_input] int64 prompts: the context, a list of `split`, the separator."""
        queries = self.sample_lists(n, generator, split)  # [n, K]
        rows = [torch.tensor(self.lead + (self.instruction if self.context == "told" else ()),
                             dtype=torch.int64).expand(n, -1)]
        if self.context == "shown":
            demos = self.sample_lists(n, generator, "train")  # [n, K]
            same = (demos == queries).all(dim=1)
            while bool(same.any()):  # a worked example is never the query itself
                demos[same] = self.sample_lists(int(same.sum()), generator, "train")
                same = (demos == queries).all(dim=1)
            demo_ids = self.word_ids[demos]  # [n, K]
            rows += [demo_ids, self._const(self.separator, n), demo_ids[:, self.order], self._const(self.newline, n)]
        rows += [self.word_ids[queries], self._const(self.separator, n)]
        return torch.cat(rows, dim=1)  # [n, n_input]

    @staticmethod
    def _const(ids: tuple[int, ...], n: int) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.int64).expand(n, -1)

    # ----- the definition ------------------------------------------------------------------------------------
    def _reference(self, inputs: list[int], index: int) -> list[int]:
        query = inputs[self.query_start : self.query_start + K]
        return [query[i] for i in ORDERS[self.transform]]

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        query = inputs[:, self.query_start : self.query_start + K]  # [n, K]
        return query[:, self.order]  # [n, K]


def leading_special_tokens(encode_prompt: Encoder, encode: Encoder) -> list[int]:
    """The special tokens a tokenizer puts before a text (a BOS token, or none)."""
    probe = "Words"
    full, bare = encode_prompt(probe), encode(probe)
    return list(full[: len(full) - len(bare)]) if full[len(full) - len(bare):] == bare else []


def word_token_ids(encode: Encoder, source: str = "") -> list[int]:
    """One token id per word of WORDS (with its leading space).

    Raises:
        ConfigError: the tokenizer splits a word into several tokens, or gives two words one token.
    """
    ids = {w: encode(" " + w) for w in WORDS}
    split = [w for w, t in ids.items() if len(t) != 1]
    if split:
        raise ConfigError(f"the tokenizer of {source or 'this model'} splits {len(split)} of the lm task words into "
                          f"several tokens ({', '.join(split[:5])}): lm tasks need one token per word")
    flat = [t[0] for t in ids.values()]
    if len(set(flat)) != len(flat):
        raise ConfigError(f"the tokenizer of {source or 'this model'} gives two lm task words the same token")
    return flat


def build_lm_task(name: str, encode_prompt: Encoder, encode: Encoder, source: str = "") -> LMListTask:
    """The lm task `name` on a tokenizer's encoders (`ctxtune.hf.text.encoders`: prompt with leading special
    tokens, and plain text without any)."""
    transform, context = parse_lm_name(name)
    return LMListTask(transform, context, word_token_ids(encode, source), encode(INSTRUCTIONS[transform]),
                      encode(SEPARATOR), encode(NEWLINE), leading_special_tokens(encode_prompt, encode), source)
