"""Task definitions: hand-written examples and vectorised outputs == pure-Python reference."""

from __future__ import annotations

import pytest
import torch

from ctxtune.tasks import get_task, list_tasks

X = [2, 6, 0, 1, 4, 6, 3, 0, 1, 2]
Y = [5, 5, 5, 1, 1, 2, 3, 3, 7, 0]

# (task, input, index, expected output), all written out by hand.
EXAMPLES: list[tuple[str, list[int], int, list[int]]] = [
    ("ascending", X, 0, [0, 0, 1, 1, 2, 2, 3, 4, 6, 6]),
    ("ascending", [7, 0, 7, 0, 3, 3, 3, 1, 1, 5], 0, [0, 0, 1, 1, 3, 3, 3, 5, 7, 7]),
    ("descending", X, 0, [6, 6, 4, 3, 2, 2, 1, 1, 0, 0]),
    ("add1", X, 0, [3, 7, 1, 2, 5, 7, 4, 1, 2, 3]),
    ("add2", X, 0, [4, 8, 2, 3, 6, 8, 5, 2, 3, 4]),
    ("add2", [7] * 10, 0, [9] * 10),
    ("ascending_add1", X, 0, [1, 1, 2, 2, 3, 3, 4, 5, 7, 7]),
    ("double_hist", X, 0, [2, 2, 2, 2, 1, 2, 1, 2, 2, 2]),
    ("double_hist", Y, 0, [3, 3, 3, 2, 2, 1, 2, 2, 1, 1]),
    ("double_hist", [4] * 10, 0, [10] * 10),  # the definition; never sampled
    ("double_hist_rasp", X, 0, [4, 4, 4, 4, 2, 4, 2, 4, 4, 4]),
    ("double_hist_rasp", Y, 0, [1, 1, 1, 2, 2, 3, 2, 2, 3, 3]),
    ("double_hist_rasp", [0, 1, 2, 3, 4, 5, 6, 7, 0, 1], 0, [2, 2, 6, 6, 6, 6, 6, 6, 2, 2]),
    ("copy", X, 0, X),
    ("reverse", X, 0, [2, 1, 0, 3, 6, 4, 1, 0, 6, 2]),
    ("histogram", X, 0, [2, 2, 2, 1, 1, 0, 2, 0, 0, 0]),
    ("histogram", Y, 0, [1, 2, 1, 2, 0, 3, 0, 1, 0, 0]),
    ("histogram", [3] * 10, 0, [0, 0, 0, 9, 0, 0, 0, 0, 0, 0]),  # 10 clipped to 9
    ("modsum", X, 0, [2, 0, 0, 1, 5, 3, 6, 6, 7, 1]),
    ("modsum", [7] * 10, 0, [7, 6, 5, 4, 3, 2, 1, 0, 7, 6]),
    ("induction", X, 0, [6, 0, 1, 4, 6, 0, 1, 4, 6, 0]),
    ("induction", [3, 1, 4, 1, 5, 2, 6, 5, 3, 5], 0, [2, 6, 5, 2, 6, 5, 2, 6, 5, 2]),
    # Last token unique: its successor wraps around to position 0.
    ("induction", [1, 2, 1, 3, 2, 1, 3, 2, 1, 0], 0, [1, 2, 1, 2, 1, 2, 1, 2, 1, 2]),
    ("mix", X, 0, [0, 0, 1, 1, 2, 2, 3, 4, 6, 6]),
    ("mix", X, 1, [6, 6, 4, 3, 2, 2, 1, 1, 0, 0]),
    ("mix", X, 2, [3, 7, 1, 2, 5, 7, 4, 1, 2, 3]),
    ("mix", X, 3, [4, 8, 2, 3, 6, 8, 5, 2, 3, 4]),
    ("mix", X, 6, [3, 7, 1, 2, 5, 7, 4, 1, 2, 3]),
]


def test_every_task_has_a_hand_example() -> None:
    assert {e[0] for e in EXAMPLES} == set(list_tasks())


@pytest.mark.parametrize(("name", "inputs", "index", "expected"), EXAMPLES)
def test_hand_examples(name: str, inputs: list[int], index: int, expected: list[int]) -> None:
    task = get_task(name)
    assert task.reference(inputs, index) == expected
    vectorised = task.outputs(torch.tensor([inputs]), torch.tensor([index]))
    assert vectorised.dtype == torch.int64
    assert vectorised.tolist() == [expected]


@pytest.mark.parametrize("name", list_tasks())
def test_vectorised_matches_reference(name: str) -> None:
    task = get_task(name)
    g = torch.Generator().manual_seed(1234)
    sampled = task.sample_inputs(400, g, "train")  # the task's own distribution
    uniform = torch.randint(0, 8, (200, 10), generator=g)  # includes many-distinct draws
    constant = torch.arange(8).unsqueeze(1).expand(8, 10)  # [8, 10] all-equal edge cases
    inputs = torch.cat([sampled, uniform, constant])  # [608, 10]
    index = torch.randint(0, 1000, (inputs.shape[0],), generator=g)
    got = task.outputs(inputs, index)
    assert got.shape == (inputs.shape[0], task.n_output)
    expected = [task.reference(row, int(i)) for row, i in zip(inputs.tolist(), index.tolist(), strict=True)]
    assert got.tolist() == expected


@pytest.mark.parametrize("name", list_tasks())
def test_sampled_outputs_stay_in_vocabulary(name: str) -> None:
    task = get_task(name)
    batch = task.make_batch(2000, torch.Generator().manual_seed(5), "train")
    assert int(batch.tokens.min()) >= 0
    assert int(batch.tokens.max()) < task.d_vocab
    assert (task.d_vocab, task.n_input, task.n_output) == (10, 10, 10)


def test_double_hist_resamples_all_equal_inputs() -> None:
    task = get_task("double_hist")
    inputs = torch.tensor([[3] * 10, [3] * 9 + [4], X])
    assert task.is_valid_input(inputs).tolist() == [False, True, True]
    # Other tasks accept everything.
    assert get_task("ascending").is_valid_input(inputs).tolist() == [True, True, True]


def test_reference_rejects_wrong_length() -> None:
    with pytest.raises(ValueError):
        get_task("ascending").reference([1, 2, 3])
    with pytest.raises(ValueError):
        get_task("ascending").outputs(torch.zeros(2, 9, dtype=torch.int64))
