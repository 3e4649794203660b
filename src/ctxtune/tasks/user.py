"""Your own task: prompt/completion pairs from a JSONL file, made into a ctxtune task on a model's tokens.

File format (UTF-8, one JSON object per line; blank lines are skipped):

    {"prompt": "Q: 2 + 3 =", "completion": " 5"}
    {"prompt": "Q: 4 + 1 =", "completion": " 5"}

`prompt` and `completion` are required non-empty strings; no other keys. A prompt may appear more than once
only with the same completion (otherwise exact match has no single right answer). Every bad line is reported
with its line number and what is wrong, in one error (`read_task_file`).

Tokens. The model's tokenizer encodes the prompt with the special tokens it puts BEFORE a text (a BOS token,
if it adds one; never trailing ones) and the completion on its own, without special tokens; the completion's
tokens follow the prompt's. So start a completion with a space when the model separates words by one
(" 5", not "5"). The completion is what exact match scores: every one of its tokens must be right.

Split (stable, as `ctxtune.tasks.split` for digit inputs): an example is in the test split when the first
8 bytes of sha256(prompt text, UTF-8), as a big-endian integer, are 0 mod 4 (25% of prompts), else in train.
Equal prompts fall in the same split. Both splits need at least one example.

Layouts. A `Batch` holds sequences of one length with one `n_prompt`, so examples are grouped by layout
(prompt tokens, completion tokens). `make_batch` (training) picks a layout with probability proportional to
its number of examples in the split, then draws the batch from it uniformly with replacement: over steps
every example is seen with its own frequency. `make_batches` (evaluation, analyses) gives one batch per
layout: on the train split n draws with replacement; on the test split the test examples in file order,
cycled from `start_index`, so evaluating exactly the test split's size scores each example once.

Names. A text task is registered as "file_" + the first 16 hex digits of sha256 over its token ids and
splits: the same file through the same tokenizer gives the same name; another tokenizer another one. Its
tokenised form is saved as JSON (`save_task`, schema "ctxtune.task/1"; never a pickle) next to a run that
trains on it, and `register_run_tasks(run_folder)` registers it again before the run folder is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctxtune.errors import ConfigError, not_found
from ctxtune.tasks.base import Batch, Task, get_task, list_tasks, register_task
from ctxtune.tasks.split import N_BUCKETS, TEST_BUCKET

SCHEMA = "ctxtune.task/1"
PREFIX = "file_"
KEYS = ("prompt", "completion")
MAX_FILE_BYTES = 64 * 2**20
MAX_EXAMPLES = 1_000_000
SHOWN_ERRORS = 5
Encoder = Callable[[str], list[int]]


@dataclass(frozen=True)
class TextExample:
    """One prompt/completion pair: its line in the file, its text and (once tokenised) its token ids."""

    line: int
    prompt: str
    completion: str
    split: str
    prompt_ids: tuple[int, ...] = ()
    completion_ids: tuple[int, ...] = ()

    @property
    def layout(self) -> tuple[int, int]:
        return len(self.prompt_ids), len(self.completion_ids)


def text_split(prompt: str) -> str:
    """"test" or "train" for a prompt (module docstring: sha256 of the UTF-8 text, bucket 0 of 4 is test)."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % N_BUCKETS == TEST_BUCKET else "train"


# ----- reading and validating the file ------------------------------------------------------------------------
def _line_problem(raw: bytes) -> tuple[str | None, dict[str, Any] | None]:
    """(what is wrong with one line, or None; the parsed object)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (byte {exc.start})", None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return f"not valid JSON ({str(exc).splitlines()[0][:80]})", None
    if not isinstance(obj, dict):
        return f'expected a JSON object {{"prompt": ..., "completion": ...}}, got {type(obj).__name__}', None
    missing = [k for k in KEYS if k not in obj]
    extra = sorted(k for k in obj if k not in KEYS)
    if missing or extra:
        parts = ([f"missing {', '.join(repr(k) for k in missing)}"] if missing else []) + (
            [f"unknown key(s) {', '.join(repr(k) for k in extra)}"] if extra else [])
        return "; ".join(parts) + ' (expected exactly "prompt" and "completion")', None
    for key in KEYS:
        if not isinstance(obj[key], str):
            return f"{key!r} must be a string, got {type(obj[key]).__name__}", None
        if not obj[key]:
            return f"{key!r} is empty", None
    return None, obj


def _bad_file(path: Path, problems: list[tuple[int, str]]) -> ConfigError:
    shown = "; ".join(f"line {n}: {what}" for n, what in problems[:SHOWN_ERRORS])
    more = f"; and {len(problems) - SHOWN_ERRORS} more" if len(problems) > SHOWN_ERRORS else ""
    count = f"{len(problems)} bad line{'s' if len(problems) > 1 else ''}"
    return ConfigError(f"task file {path}: {count}: {shown}{more}")


def read_task_file(path: str | Path) -> list[TextExample]:
    """The examples of a JSONL task file (module docstring), validated line by line.

    Raises:
        ConfigError: the file is missing, too large or empty, or any line is bad: one error naming every bad
            line's number and problem (the first few, and how many more).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(not_found("task file", path))
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ConfigError(f"task file {path} has {size} bytes; at most {MAX_FILE_BYTES} are read")
    problems: list[tuple[int, str]] = []
    examples: list[TextExample] = []
    seen: dict[str, tuple[int, str]] = {}
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        problem, obj = _line_problem(raw)
        if problem is None and obj is not None:
            first = seen.setdefault(obj["prompt"], (number, obj["completion"]))
            if first[1] != obj["completion"]:
                problem = f"the prompt of line {first[0]} again with another completion"
        if problem is not None:
            problems.append((number, problem))
        elif obj is not None:
            examples.append(TextExample(number, obj["prompt"], obj["completion"], text_split(obj["prompt"])))
    if problems:
        raise _bad_file(path, problems)
    if not examples:
        raise ConfigError(f'task file {path} has no examples: one JSON object per line, {{"prompt": ..., '
                          '"completion": ...}')
    if len(examples) > MAX_EXAMPLES:
        raise ConfigError(f"task file {path} has {len(examples)} examples; at most {MAX_EXAMPLES}")
    return examples


def tokenize(examples: list[TextExample], encode_prompt: Encoder, encode_completion: Encoder,
             path: str | Path = "") -> list[TextExample]:
    """The examples with their token ids; a prompt or completion that encodes to no token is a bad line."""
    out, problems = [], []
    for ex in examples:
        p, c = tuple(int(t) for t in encode_prompt(ex.prompt)), tuple(int(t) for t in encode_completion(ex.completion))
        if not p or not c:
            problems.append((ex.line, f"the {'prompt' if not p else 'completion'} encodes to no token"))
        out.append(TextExample(ex.line, ex.prompt, ex.completion, ex.split, p, c))
    if problems:
        raise _bad_file(Path(path), problems)
    return out


# ----- the task ---------------------------------------------------------------------------------------------
class TextTask(Task):
    """A task given by tokenised prompt/completion pairs (module docstring: split, layouts, name)."""

    n_values = 0

    def __init__(self, examples: Sequence[TextExample], source: str = "", tokenizer: str = "") -> None:
        self.examples = tuple(examples)
        self.source, self.tokenizer = source, tokenizer
        if not self.examples or not all(ex.prompt_ids and ex.completion_ids for ex in self.examples):
            raise ConfigError("a text task needs tokenised examples (tasks.user.tokenize)")
        self.by_split = {s: [ex for ex in self.examples if ex.split == s] for s in ("train", "test")}
        empty = [s for s, exs in self.by_split.items() if not exs]
        if empty:
            counts = ", ".join(f"{s} {len(exs)}" for s, exs in self.by_split.items())
            raise ConfigError(f"task file {source or '(given examples)'}: the {empty[0]} split is empty ({counts} "
                              "examples; the split puts about 1 prompt in 4 in test): give more examples")
        self.name = PREFIX + content_hash(self.examples)[:16]
        self.d_vocab = 1 + max(max(ex.prompt_ids + ex.completion_ids) for ex in self.examples)
        self.n_input = max(len(ex.prompt_ids) for ex in self.examples)
        self.n_output = max(len(ex.completion_ids) for ex in self.examples)
        self._answers = {ex.prompt_ids: ex.completion_ids for ex in self.examples}

    def __repr__(self) -> str:
        return f"TextTask(name={self.name!r}, source={self.source!r}, examples={len(self.examples)})"

    def layouts(self, split: str) -> dict[tuple[int, int], list[TextExample]]:
        """{(prompt tokens, completion tokens): examples of `split` with that layout}, in first-seen order."""
        groups: dict[tuple[int, int], list[TextExample]] = {}
        for ex in self.by_split[split]:
            groups.setdefault(ex.layout, []).append(ex)
        return groups

    # ----- the Task definition: a lookup of the completion of a known prompt -----------------------------
    def reference(self, inputs: Sequence[int], index: int = 0) -> list[int]:
        return self._reference([int(v) for v in inputs], index)

    def _reference(self, inputs: list[int], index: int) -> list[int]:
        answer = self._answers.get(tuple(inputs))
        if answer is None:
            raise ValueError(f"task {self.name!r}: this prompt is not one of its examples")
        return list(answer)

    def outputs(self, inputs: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return self._outputs(inputs.to(torch.int64), torch.zeros(inputs.shape[0], dtype=torch.int64))

    def _outputs(self, inputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        rows = [self._reference(row, 0) for row in inputs.tolist()]
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"task {self.name!r}: these prompts have completions of different lengths")
        return torch.tensor(rows, dtype=torch.int64).reshape(inputs.shape[0], -1)  # [n, n_completion]

    def sample_inputs(self, n: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        raise ConfigError(f"task {self.name!r} comes from a file: it has examples (make_batch), no input sampler")

    # ----- batches ---------------------------------------------------------------------------------------
    def make_batch(self, n: int, generator: torch.Generator, split: str = "train", placeholders: int = 0,
                   start_index: int = 0) -> Batch:
        """n examples of ONE layout: the layout drawn in proportion to its examples, rows with replacement."""
        groups = list(self.layouts(_split(split)).values())
        weights = torch.tensor([len(g) for g in groups], dtype=torch.float64)
        group = groups[int(torch.multinomial(weights, 1, generator=generator))]
        picks = torch.randint(0, len(group), (_positive(n),), generator=generator)
        return _batch([group[i] for i in picks.tolist()], placeholders)

    def make_batches(self, n: int, generator: torch.Generator, split: str = "train", placeholders: int = 0,
                     start_index: int = 0) -> list[Batch]:
        """n examples as one batch per layout (module docstring: test examples cycle in file order)."""
        pool = self.by_split[_split(split)]
        if split == "test":
            chosen = [pool[(start_index + i) % len(pool)] for i in range(_positive(n))]
        else:
            chosen = [pool[i] for i in torch.randint(0, len(pool), (_positive(n),), generator=generator).tolist()]
        groups: dict[tuple[int, int], list[TextExample]] = {}
        for ex in chosen:
            groups.setdefault(ex.layout, []).append(ex)
        return [_batch(group, placeholders) for group in groups.values()]

    # ----- saved form --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "name": self.name, "source": self.source, "tokenizer": self.tokenizer,
                "examples": [{"line": ex.line, "prompt": ex.prompt, "completion": ex.completion, "split": ex.split,
                              "prompt_ids": list(ex.prompt_ids), "completion_ids": list(ex.completion_ids)}
                             for ex in self.examples]}


def _split(split: str) -> str:
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r}; expected 'train' or 'test'")
    return split


def _positive(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"number of examples must be a positive integer, got {n!r}")
    return n


def _batch(examples: list[TextExample], placeholders: int) -> Batch:
    """One rectangular batch of same-layout examples: [placeholders zeros] ++ prompt ++ completion."""
    if isinstance(placeholders, bool) or not isinstance(placeholders, int) or placeholders < 0:
        raise ConfigError(f"placeholders must be a non-negative integer, got {placeholders!r}")
    rows = [ex.prompt_ids + ex.completion_ids for ex in examples]
    tokens = torch.tensor(rows, dtype=torch.int64)  # [n, n_prompt + n_completion]
    tokens = torch.cat([torch.zeros(len(rows), placeholders, dtype=torch.int64), tokens], dim=1)
    n_prompt = placeholders + len(examples[0].prompt_ids)
    mask = torch.zeros_like(tokens, dtype=torch.bool)  # [n, seq]
    mask[:, n_prompt:] = True
    return Batch(tokens=tokens, loss_mask=mask, n_prompt=n_prompt, task_index=torch.zeros(len(rows), dtype=torch.int64))


def content_hash(examples: Sequence[TextExample]) -> str:
    """sha256 hex of the token ids and splits of the examples, in order (what the task is, not where it lies)."""
    data = [[list(ex.prompt_ids), list(ex.completion_ids), ex.split] for ex in examples]
    return hashlib.sha256(json.dumps(data, separators=(",", ":")).encode()).hexdigest()


# ----- building, registering, saving ------------------------------------------------------------------------
def text_task_from_file(path: str | Path, encode_prompt: Encoder, encode_completion: Encoder,
                        tokenizer: str = "") -> TextTask:
    """Read, validate and tokenise a JSONL task file; the task is registered under its content name."""
    path = Path(path).expanduser()
    examples = tokenize(read_task_file(path), encode_prompt, encode_completion, path)
    return register_text_task(TextTask(examples, str(path.resolve()), tokenizer))


def register_text_task(task: TextTask) -> TextTask:
    """Register `task` (the one already registered under its name when there is one: same name, same content)."""
    if task.name in list_tasks():
        return get_task(task.name)  # type: ignore[return-value]
    register_task(task)
    return task


def task_file_name(name: str) -> str:
    """The file a run folder keeps a text task in."""
    return f"{name}.task.json"


def save_task(task: TextTask, folder: str | Path) -> Path:
    """Write the tokenised task as JSON into `folder` (created); returns the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / task_file_name(task.name)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(task.to_dict()))
    tmp.replace(path)
    return path


def load_task(path: str | Path) -> TextTask:
    """A text task saved by `save_task` (validated; its name must match its content)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"cannot read the saved task {path}: {str(exc).splitlines()[0][:120]}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("examples"), list):
        raise ConfigError(f"{path} is not a saved ctxtune text task (schema {SCHEMA!r})")
    try:
        examples = [TextExample(int(e["line"]), str(e["prompt"]), str(e["completion"]), _split(e["split"]),
                                tuple(int(t) for t in e["prompt_ids"]), tuple(int(t) for t in e["completion_ids"]))
                    for e in data["examples"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: a saved example is malformed ({exc})") from None
    task = TextTask(examples, str(data.get("source", "")), str(data.get("tokenizer", "")))
    if task.name != data.get("name"):
        raise ConfigError(f"{path}: its examples do not match its name {data.get('name')!r} (edited by hand?)")
    return task


def register_run_tasks(run_dir: str | Path) -> list[str]:
    """Register the text tasks a run folder trained or evaluates on from their saved copies in the folder, so the
    folder can be read (`ctxtune.train.runs.read_run`) in a new process. Returns the names registered.

    Raises:
        ConfigError: a text task of the run has no saved copy in the folder.
    """
    run_dir = Path(run_dir).expanduser()
    try:
        spec = json.loads((run_dir / "config.json").read_text()).get("spec") or {}
        names = {t for s in spec.get("streams", []) for t in [s.get("task"), *s.get("eval_tasks", [])]}
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):
        return []  # not a readable run folder: reading it will say why
    done = []
    for name in sorted(n for n in names if isinstance(n, str) and n.startswith(PREFIX) and n not in list_tasks()):
        saved = run_dir / task_file_name(name)
        if not saved.is_file():
            raise ConfigError(f"{run_dir} was trained on the text task {name} (from a JSONL file) but its saved copy "
                              f"{saved.name} is missing from the run folder")
        register_text_task(load_task(saved))
        done.append(name)
    return done
