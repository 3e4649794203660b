"""Study specs: typed, validated loading of the TOML files in `ctxtune/studies/`.

A study spec names its pretrainings (`[bases.NAME]`), its adaptations (`[adaptations.NAME]`), per
scale (`quick`, `paper`, optionally `standard`), the paper's number for every cell (`[paper]`) and the
qualitative claims with their thresholds (`[[claims]]`). Unknown keys anywhere are a ConfigError naming
the key and the file.

Layout of one spec (every key is checked; see the shipped studies for complete examples):

    name = "elicit"                 # must equal the file stem
    title = "..."; paper_ref = "..."; summary = "..."
    group = "paper"                 # "paper" (run by default) or "beyond" (our extensions: --only / --group)
    [bases.mix]
    task = "mix"                    # pretraining task
    share = "mix_quick"             # optional: studies naming the same share id reuse one run
    per_seed = false                # false: one base (pretrained with seed `base_seed`) for all seeds
    eval_tasks = ["ascending", ...] # the pretrained model is evaluated on these (row "<base>")
    [bases.mix.scale.quick]
    model = {...}                   # ModelConfig fields
    train = {...}                   # TrainConfig fields
    [adaptations.prefix]
    base = "mix"; method = "prefix"; tasks = ["ascending", ...]   # one adapter per task (a bank)
    eval_tasks = [...]              # every adapter is evaluated on each (default: its own task)
    extension = false               # true: not in the paper (soft_prompt, prefix_kv, suffix, ...)
    stack_seeds = true              # seeds as extra adapters of one bank run (needs a shared base)
    [adaptations.prefix.scale.quick]
    options = {n_virtual = 1}; train = {...}
    [analyses.NAME]                 # optional: computed from finished runs, per seed (ctxtune.experiments.analyses)
    kind = "decomposition"          # a registered analysis
    adaptations = ["prefix", ...]   # the runs it reads
    options = {...}                 # the analysis' own options
    [paper]
    "prefix.ascending/ascending" = 0.9409     # cell "<row>/<eval task>", accuracy as a fraction
    [[claims]]
    id = "elicit"; text = "..."
    checks = [{cell = "prefix.ascending/ascending", op = ">=", value = 0.90}]

Rows: a base's row is its name; an adaptation's adapter trained on task T is row "<adaptation>.<T>".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ctxtune.claims import OPS, holds
from ctxtune.configs import check_keys as _check_keys
from ctxtune.configs import load_toml
from ctxtune.errors import ConfigError, not_found

SCALES = ("quick", "standard", "paper")
GROUPS = ("paper", "beyond")


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings, got {value!r}")
    return tuple(value)


def _check_task(name: str, where: str) -> None:
    import ctxtune.train  # noqa: F401 - registers the task families built on a model's tokenizer (lm_*)
    from ctxtune.tasks import get_task, is_task

    if is_task(name):  # a family's task (lm_*) is known by name: built when a run needs it, not to load a spec
        return
    try:
        get_task(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any lookup failure is a bad name
        raise ConfigError(f"{where}: unknown task {name!r} ({exc})") from None


@dataclass(frozen=True)
class ScaleSettings:
    """What one scale sets for a base or an adaptation: model (bases only), train, options."""

    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BaseSpec:
    """A base: pretrained by the study (task, model and train per scale), or an existing model (`source`: a
    Hugging Face model such as "smollm2", a HF folder or .gguf file, or a ctxtune run folder), used as it is."""

    name: str
    task: str
    share: str | None
    per_seed: bool
    base_seed: int
    eval_tasks: tuple[str, ...]
    scales: dict[str, ScaleSettings]
    source: str | None = None


@dataclass(frozen=True)
class AdaptationSpec:
    name: str
    base: str
    method: str
    tasks: tuple[str, ...]
    eval_tasks: tuple[str, ...]
    extension: bool
    stack_seeds: bool
    note: str
    scales: dict[str, ScaleSettings]


@dataclass(frozen=True)
class Check:
    cell: str
    op: str
    value: float

    def holds(self, observed: float) -> bool:
        return holds(observed, self.op, self.value)

    def describe(self) -> str:
        return f"{self.cell} {self.op} {self.value:.0%}"


@dataclass(frozen=True)
class Claim:
    """A qualitative claim; `evidence` maps a scale to what was measured there (shown when the claim does
    not hold at the scale being reported, so a verdict never stands without the numbers behind it)."""

    id: str
    text: str
    checks: tuple[Check, ...]
    evidence: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AnalysisSpec:
    """An analysis of finished runs (kind registered in ctxtune.experiments.analyses), one job per seed."""

    name: str
    kind: str
    adaptations: tuple[str, ...]
    options: dict[str, Any]


@dataclass(frozen=True)
class StudySpec:
    name: str
    title: str
    paper_ref: str
    summary: str
    bases: dict[str, BaseSpec]
    adaptations: dict[str, AdaptationSpec]
    paper: dict[str, float]
    claims: tuple[Claim, ...]
    notes: dict[str, str]
    path: str
    group: str = "paper"
    analyses: dict[str, AnalysisSpec] = field(default_factory=dict)

    @property
    def scales(self) -> tuple[str, ...]:
        """Scales every base and adaptation defines (an existing model serves every scale)."""
        parts = [*(b for b in self.bases.values() if b.source is None), *self.adaptations.values()]
        return tuple(s for s in SCALES if all(s in p.scales for p in parts))

    def rows(self) -> list[str]:
        out = list(self.bases)
        for a in self.adaptations.values():
            out += [f"{a.name}.{t}" for t in a.tasks]
        return out


def _scale_table(data: Any, where: str, is_base: bool) -> dict[str, ScaleSettings]:
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}.scale must be a table with at least one of {', '.join(SCALES)}")
    out = {}
    for scale, table in data.items():
        if scale not in SCALES:
            raise ConfigError(f"unknown scale {scale!r} in {where}.scale; known: {', '.join(SCALES)}")
        allowed = {"model", "train"} if is_base else {"train", "options"}
        _check_keys(table, allowed, f"{where}.scale.{scale}", required={"model", "train"} if is_base else {"train"})
        for key in allowed:
            if key in table and not isinstance(table[key], dict):
                raise ConfigError(f"{where}.scale.{scale}.{key} must be a table")
        settings = ScaleSettings(
            model=dict(table.get("model", {})), train=dict(table.get("train", {})),
            options=dict(table.get("options", {})),
        )
        _validate_settings(settings, f"{where}.scale.{scale}", is_base)
        out[scale] = settings
    return out


def _validate_settings(s: ScaleSettings, where: str, is_base: bool) -> None:
    from ctxtune.model import ModelConfig
    from ctxtune.train.config import TrainConfig

    try:
        if is_base:
            ModelConfig.from_dict(s.model)
        TrainConfig.from_dict(s.train)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _claims(data: Any, where: str) -> tuple[Claim, ...]:
    if not isinstance(data, list):
        raise ConfigError(f"{where}: claims must be an array of tables ([[claims]])")
    out = []
    for i, c in enumerate(data):
        _check_keys(c, {"id", "text", "checks", "evidence"}, f"{where} claims[{i}]",
                    required={"id", "text", "checks"})
        checks = []
        if not isinstance(c["checks"], list) or not c["checks"]:
            raise ConfigError(f"{where} claim {c['id']!r}: checks must be a non-empty list")
        for j, ch in enumerate(c["checks"]):
            _check_keys(ch, {"cell", "op", "value"}, f"{where} claim {c['id']!r} check {j}", {"cell", "op", "value"})
            if ch["op"] not in OPS:
                raise ConfigError(f"{where} claim {c['id']!r}: op must be one of {', '.join(OPS)}, got {ch['op']!r}")
            value = ch["value"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{where} claim {c['id']!r}: value must be a finite number, got {value!r}")
            checks.append(Check(str(ch["cell"]), ch["op"], float(value)))
        out.append(Claim(str(c["id"]), str(c["text"]), tuple(checks), _evidence(c.get("evidence", {}), where, c["id"])))
    return tuple(out)


def _evidence(data: Any, where: str, claim_id: Any) -> dict[str, str]:
    if not isinstance(data, dict) or any(k not in SCALES or not isinstance(v, str) for k, v in data.items()):
        raise ConfigError(f"{where} claim {claim_id!r}: evidence must map a scale ({', '.join(SCALES)}) to a text")
    return dict(data)


def _typed(data: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    value = data.get(key, default)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ConfigError(f"{where}.{key} must be {kind.__name__}, got {value!r}")
    return value


def _base(name: str, b: Any, w: str) -> BaseSpec:
    if isinstance(b, dict) and "source" in b:
        _check_keys(b, {"source"}, w, {"source"})
        if not isinstance(b["source"], str) or not b["source"]:
            raise ConfigError(f"{w}.source must name a model (a Hugging Face model, folder or .gguf, or a run folder)")
        return BaseSpec(name, "", None, False, 0, (), {}, source=b["source"])
    _check_keys(b, {"task", "share", "per_seed", "base_seed", "eval_tasks", "scale"}, w, {"task", "scale"})
    _check_task(b["task"], w)
    eval_tasks = _str_list(b.get("eval_tasks", [b["task"]]), f"{w} eval_tasks")
    for t in eval_tasks:
        _check_task(t, w)
    base_seed = _typed(b, "base_seed", int, 0, w)
    if base_seed < 0:
        raise ConfigError(f"{w}.base_seed must be non-negative, got {base_seed}")
    return BaseSpec(name, b["task"], _typed(b, "share", str, None, w), _typed(b, "per_seed", bool, True, w),
                    base_seed, eval_tasks, _scale_table(b["scale"], w, is_base=True))


def _analyses(data: Any, adaptations: dict[str, AdaptationSpec], where: str) -> dict[str, AnalysisSpec]:
    from ctxtune.experiments.analyses import check_analysis

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: [analyses] must be a table of tables")
    out = {}
    for name, a in data.items():
        w = f"{where} [analyses.{name}]"
        _check_keys(a, {"kind", "adaptations", "options"}, w, {"kind", "adaptations"})
        names = _str_list(a["adaptations"], f"{w} adaptations")
        missing = [n for n in names if n not in adaptations]
        if missing or not names:
            raise ConfigError(f"{w}: adaptations must name adaptations of this study, got {list(names)}")
        options = a.get("options", {})
        if not isinstance(options, dict):
            raise ConfigError(f"{w}: options must be a table")
        check_analysis(str(a["kind"]), [adaptations[n] for n in names], options, w)
        out[name] = AnalysisSpec(name, str(a["kind"]), names, dict(options))
    return out


def parse_study(data: dict[str, Any], where: str = "<spec>", stem: str | None = None) -> StudySpec:
    """Validate a parsed TOML document into a StudySpec (every problem is one ConfigError line)."""
    from ctxtune.methods import get_method_class

    top = {"name", "title", "paper_ref", "summary", "group", "bases", "adaptations", "analyses", "paper", "claims",
           "notes"}
    _check_keys(data, top, where, required={"name", "title", "bases", "adaptations"})
    name = data["name"]
    if stem is not None and name != stem:
        raise ConfigError(f"{where}: name {name!r} must equal the file name {stem!r}")
    bases: dict[str, BaseSpec] = {}
    if not isinstance(data["bases"], dict) or not isinstance(data["adaptations"], dict):
        raise ConfigError(f"{where}: [bases] and [adaptations] must be tables of tables")
    for bname, b in data["bases"].items():
        bases[bname] = _base(bname, b, f"{where} [bases.{bname}]")
    adaptations: dict[str, AdaptationSpec] = {}
    allowed = {"base", "method", "tasks", "eval_tasks", "extension", "stack_seeds", "note", "scale"}
    for aname, a in data["adaptations"].items():
        w = f"{where} [adaptations.{aname}]"
        _check_keys(a, allowed, w, {"base", "method", "tasks", "scale"})
        if a["base"] not in bases:
            raise ConfigError(f"{w}: base {a['base']!r} is not defined; bases: {', '.join(bases)}")
        try:
            cls = get_method_class(a["method"])
        except ConfigError as exc:
            raise ConfigError(f"{w}: {exc}") from None
        tasks = _str_list(a["tasks"], f"{w} tasks")
        if not tasks or len(set(tasks)) != len(tasks):
            raise ConfigError(f"{w}: tasks must be a non-empty list without repeats")
        for t in (*tasks, *a.get("eval_tasks", [])):
            _check_task(t, w)
        stack = _typed(a, "stack_seeds", bool, False, w)
        if stack and bases[a["base"]].per_seed:
            raise ConfigError(f"{w}: stack_seeds needs a base shared by all seeds (per_seed = false)")
        if (len(tasks) > 1 or stack) and not cls.supports_bank:
            raise ConfigError(
                f"{w}: method {a['method']!r} has no adapter banks; give one task and stack_seeds = false"
            )
        scales = _scale_table(a["scale"], w, is_base=False)
        for scale, s in scales.items():
            try:
                cls.config_cls.from_dict(s.options, method=a["method"])
            except (ConfigError, TypeError) as exc:
                raise ConfigError(f"{w}.scale.{scale}: {exc}") from None
        adaptations[aname] = AdaptationSpec(
            aname, a["base"], a["method"], tasks, _str_list(a.get("eval_tasks", []), f"{w} eval_tasks"),
            _typed(a, "extension", bool, False, w), stack, _typed(a, "note", str, "", w), scales,
        )
    if set(bases) & set(adaptations):
        raise ConfigError(f"{where}: a base and an adaptation share a name: {sorted(set(bases) & set(adaptations))}")
    paper = data.get("paper", {})
    if not isinstance(paper, dict) or not all(isinstance(v, (int, float)) for v in paper.values()):
        raise ConfigError(f"{where}: [paper] must map cells to numbers")
    group = data.get("group", "paper")
    if group not in GROUPS:
        raise ConfigError(f"{where}: group must be one of {', '.join(GROUPS)}, got {group!r}")
    spec = StudySpec(
        group=group, analyses=_analyses(data.get("analyses", {}), adaptations, where),
        name=name, title=str(data["title"]), paper_ref=str(data.get("paper_ref", "")),
        summary=str(data.get("summary", "")),
        bases=bases, adaptations=adaptations, paper={k: float(v) for k, v in paper.items()},
        claims=_claims(data.get("claims", []), where), notes={str(k): str(v) for k, v in data.get("notes", {}).items()},
        path=where,
    )
    rows = set(spec.rows())
    cells = list(spec.paper) + [c.cell for cl in spec.claims for c in cl.checks]
    for cell in cells:
        row, _, task = cell.rpartition("/")
        if row not in rows or not task:
            raise ConfigError(f"{where}: cell {cell!r} names no row of this study; rows: {', '.join(sorted(rows))}")
    if not spec.scales:
        raise ConfigError(f"{where}: no scale is defined by every base and adaptation")
    return spec


def load_study(path: str | Path) -> StudySpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(not_found("study spec", path))
    return parse_study(load_toml(path), str(path), stem=path.stem)


def studies_dir() -> Path:
    """The packaged study specs (ctxtune/studies/*.toml): the one source of truth."""
    return Path(str(resources.files("ctxtune") / "studies"))


STUDY_ORDER = ("cannot_learn_new_attention", "elicit", "compose_vs_new", "prefix_vs_lora", "suffix_vs_prefix",
               "diagnose_validation")


def list_studies() -> list[str]:
    names = sorted(p.stem for p in studies_dir().glob("*.toml"))
    return [n for n in STUDY_ORDER if n in names] + [n for n in names if n not in STUDY_ORDER]


def get_study(name: str) -> StudySpec:
    path = studies_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown study {name!r}; known studies: {', '.join(list_studies())}")
    return load_study(path)
