"""Study specs: every shipped spec validates and runs for 2 steps; bad specs are one-line ConfigErrors."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from ctxtune.errors import ConfigError
from ctxtune.experiments.jobs import execute
from ctxtune.experiments.plan import expand, scaled_train
from ctxtune.experiments.reproduce import reproduce, select_studies
from ctxtune.experiments.spec import get_study, list_studies, load_study, parse_study, studies_dir

STUDIES = ["cannot_learn_new_attention", "elicit", "compose_vs_new", "prefix_vs_lora"]
BEYOND = ["suffix_vs_prefix", "diagnose_validation", "real_lm"]
REPO = Path(__file__).resolve().parents[2]


def test_all_four_studies_ship_with_quick_and_paper_scales() -> None:
    assert list_studies() == STUDIES + BEYOND
    assert [s.name for s in select_studies(None)] == STUDIES
    assert [s.name for s in select_studies(None, "beyond")] == BEYOND
    for name in STUDIES:
        spec = get_study(name)
        assert {"quick", "paper"} <= set(spec.scales)
        assert spec.claims and spec.paper


def test_top_level_studies_folder_has_no_second_copy() -> None:
    # One source of truth: the packaged specs; the top-level folder only points there.
    top = REPO / "studies"
    if top.is_dir():
        assert not list(top.glob("*.toml")), "study specs live in src/ctxtune/studies/ only"
    assert (studies_dir() / "elicit.toml").is_file()


def _raw(name: str) -> dict:
    return tomllib.loads((studies_dir() / f"{name}.toml").read_text())


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.update(colour="red"), "unknown key(s)"),
        (lambda d: d["adaptations"]["prefix"].update(method="telepathy"), "unknown method 'telepathy'"),
        (lambda d: d["adaptations"]["prefix"].update(tasks=["sorting_backwards"]), "sorting_backwards"),
        (lambda d: d["adaptations"]["prefix"]["scale"]["quick"]["train"].update(stepz=3), "unknown train key"),
        (lambda d: d["adaptations"]["prefix"]["scale"]["quick"]["options"].update(rank=2), "unknown prefix key"),
        (lambda d: d["bases"]["mix"]["scale"]["quick"]["model"].update(n_layer=2), "unknown model key"),
        (lambda d: d["paper"].update({"nothing/ascending": 0.5}), "names no row"),
        (lambda d: d["claims"][0]["checks"][0].update(op="~"), "op must be one of"),
        (lambda d: d["adaptations"]["prefix"].update(stack_seeds=True), "stack_seeds needs a base shared"),
        (lambda d: d["claims"][0].update(evidence={"huge": "x"}), "evidence must map a scale"),
        (lambda d: d["claims"][0].update(evidence={"standard": 3}), "evidence must map a scale"),
        (lambda d: d["claims"][0].update(evidence="held"), "evidence must map a scale"),
    ],
)
def test_bad_spec_is_one_line_config_error(mutate, needle: str) -> None:
    data = _raw("elicit")
    mutate(data)
    with pytest.raises(ConfigError) as err:
        parse_study(data, "elicit.toml")
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_load_study_rejects_name_mismatch_and_bad_toml(tmp_path: Path) -> None:
    bad = tmp_path / "other.toml"
    bad.write_text((studies_dir() / "elicit.toml").read_text())
    with pytest.raises(ConfigError, match="must equal the file name"):
        load_study(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("name = [")
    with pytest.raises(ConfigError, match="malformed TOML"):
        load_study(broken)
    with pytest.raises(ConfigError, match="unknown study"):
        get_study("nope")


def test_expand_shares_the_mix_base_and_orders_dependencies(tmp_path: Path) -> None:
    from ctxtune.train import RunSpec

    specs = [get_study(n) for n in STUDIES]
    jobs = expand(specs, "quick", 3, tmp_path)
    json.dumps(jobs)  # JSON-serialisable
    assert all(RunSpec.from_dict(j["spec"]) for j in jobs if j["kind"] == "train")  # every job is a valid RunSpec
    bases = [j for j in jobs if j["kind"] == "train" and j["spec"]["kind"] == "pretrain"]
    mix = [j for j in bases if j["id"].startswith("base/mix-")]
    # Every seed pretrains its own bases. compose_vs_new and prefix_vs_lora share one quick mix base per seed (the
    # authors' layout, same configuration); elicit's is shallower (2 layers), so its own runs.
    assert sorted(sorted(j["rows"]) for j in mix) == [["compose_vs_new", "prefix_vs_lora"]] * 3 + [["elicit"]] * 3
    assert len({j["spec"]["streams"][0]["seed"] for j in mix if "elicit" in j["rows"]}) == 3
    assert len([j for j in bases if "cannot_learn" in j["id"]]) == 3  # one base per seed
    for seed in range(3):
        base = next(j for j in mix if "elicit" in j["rows"] and j["id"].endswith(f"/s{seed}"))
        tuned = next(j for j in jobs if j["id"] == f"elicit/prefix/s{seed}")
        assert len(tuned["spec"]["streams"]) == 4 and tuned["depends_on"] == [base["id"]]
        assert tuned["spec"]["base"] == base["out_dir"]
    position = {j["id"]: i for i, j in enumerate(jobs)}
    assert all(position[d] < position[j["id"]] for j in jobs for d in j["depends_on"])  # dependencies first
    # At paper scale every study pretrains its own mix base, as the authors did: elicit's has 1 layer and no
    # attention norm, compose_vs_new's 10 leading placeholders and prefix_vs_lora's 12 (block size 31).
    paper = [j for j in expand(specs, "paper", 1, tmp_path) if j["id"].startswith("base/mix-")]
    assert sorted(sorted(j["rows"]) for j in paper) == [["compose_vs_new"], ["elicit"], ["prefix_vs_lora"]]
    assert sorted(j["spec"]["train"]["placeholders"] for j in paper) == [0, 10, 12]


def test_step_factor_scales_every_step_count() -> None:
    out = scaled_train({"steps": 40000, "warmup": 100, "checkpoint_every": 10000, "lr": 1e-3}, 0.01, None)
    assert out == {"steps": 400, "warmup": 1, "checkpoint_every": 100, "lr": 1e-3}
    assert scaled_train({"steps": 10}, 0.001, None)["steps"] == 1


def test_every_study_runs_for_two_steps(tmp_path: Path) -> None:
    summary = reproduce(scale="quick", seeds=2, out=tmp_path, train_override={"steps": 2}, eval_examples=16,
                        threads=1, quiet=True)
    assert summary["jobs"]["ok"] == summary["jobs"]["total"] > 0, summary["failed"]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["studies"]) == set(STUDIES)
    for name in STUDIES:
        st = doc["studies"][name]
        assert st["runs"] and all(r["status"] == "ok" for r in st["runs"])
        assert all((tmp_path / r["out_dir"] / "summary.json").is_file() for r in st["runs"])
        for cell in st["cells"]:
            if cell["paper"] is None or cell["n"]:
                assert cell["n"] in (1, 2)
    assert (tmp_path / "report.html").is_file() and (tmp_path / "report.md").is_file()
    # Idempotent: a second run returns the stored results without training again.
    job = next(j for j in json.loads((tmp_path / "plan.json").read_text())["jobs"] if "adaptation" in j)
    again = execute(job)
    assert again["cached"] and again["status"] == "ok"
    # The report is rebuilt from the files alone, also after the folder was moved.
    from ctxtune.report import build_report

    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    tmp_path.rename(moved)
    assert build_report(moved)["doc"]["jobs"]["ok"] == summary["jobs"]["total"]


def test_failed_job_is_recorded_and_dependents_skipped(tmp_path: Path) -> None:
    from ctxtune.experiments.executors import LocalExecutor
    from ctxtune.experiments.pipeline import run_plan

    jobs = expand([get_study("cannot_learn_new_attention")], "quick", 1, tmp_path, train_override={"steps": 2},
                  eval_examples=8)
    jobs[0]["spec"]["model"]["n_ctx"] = 4  # too short for the task: the pretraining fails
    plan = {"kind": "reproduce", "scale": "quick", "seeds": [0],
            "studies": {"cannot_learn_new_attention": {"title": "t", "paper_ref": "", "summary": "", "bases": {},
                                                       "adaptations": {}, "rows": [], "paper": {}, "claims": []}},
            "jobs": jobs}
    doc = run_plan(tmp_path, plan, LocalExecutor(), quiet=True)["doc"]
    runs = {r["id"]: r for r in doc["runs"]}
    assert runs[jobs[0]["id"]]["status"] == "failed" and "needs" in runs[jobs[0]["id"]]["error"]
    assert {r["status"] for k, r in runs.items() if k != jobs[0]["id"]} == {"skipped"}
    assert all((Path(j["out_dir"]) / "error.json").is_file() for j in jobs)


@pytest.mark.parametrize(("study", "matched"), [
    ("compose_vs_new", ["prefix", "prefix_kv"]),  # tied P = 10 against free P = 5
    ("prefix_vs_lora", ["prefix", "lora", "prefix_kv"]),  # the paper's equal budget
])
def test_methods_compared_at_equal_budget_have_equal_trainable_counts(study: str, matched: list[str]) -> None:
    from ctxtune.methods import make_method
    from ctxtune.model import GPT
    from ctxtune.model.config import ModelConfig

    spec = get_study(study)
    for scale in spec.scales:
        counts = {}
        for name in matched:
            adapt = spec.adaptations[name]
            model = GPT(ModelConfig(**spec.bases[adapt.base].scales[scale].model))
            counts[name] = make_method(adapt.method, model, **adapt.scales[scale].options).num_trainable()
        assert len(set(counts.values())) == 1, f"{study} at {scale}: {counts}"


@pytest.mark.hf
def test_a_study_on_an_existing_hugging_face_model(tmp_path: Path) -> None:
    """A base given by `source` (here a tiny random Llama saved with save_pretrained) is not pretrained: the
    adaptations tune it directly, on the same run boundary; a missing source fails before anything runs."""
    transformers = pytest.importorskip("transformers")
    import torch

    from ctxtune.experiments.executors import LocalExecutor
    from ctxtune.experiments.pipeline import run_plan
    from ctxtune.experiments.reproduce import study_plan

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    train = {"steps": 2, "batch_size": 4, "eval_examples": 8}
    data = {"name": "toy", "title": "t", "bases": {"llama": {"source": str(tmp_path / "llama")}},
            "adaptations": {
                "prefix": {"base": "llama", "method": "prefix", "tasks": ["ascending"], "stack_seeds": True,
                           "scale": {"quick": {"options": {"n_virtual": 2}, "train": train}}},
                "lora": {"base": "llama", "method": "lora", "tasks": ["ascending"],
                         "scale": {"quick": {"options": {"rank": 1, "targets": ["q", "v"]}, "train": train}}}}}
    study = parse_study(data, "toy", "toy")
    jobs = expand([study], "quick", 2, tmp_path / "res")
    assert [(j["id"], j["depends_on"]) for j in jobs] == [("toy/prefix/s0-1", []), ("toy/lora/s0", []),
                                                          ("toy/lora/s1", [])]
    plan = {"kind": "reproduce", "scale": "quick", "seeds": [0, 1], "studies": {"toy": study_plan(study, "quick")},
            "jobs": jobs}
    doc = run_plan(tmp_path / "res", plan, LocalExecutor(), quiet=True)["doc"]
    assert doc["jobs"]["ok"] == 3
    assert {c["cell"]: c["n"] for c in doc["studies"]["toy"]["cells"]} == {"prefix.ascending/ascending": 2,
                                                                             "lora.ascending/ascending": 2}
    data["bases"]["llama"]["source"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="base not found"):
        expand([parse_study(data, "toy", "toy")], "quick", 1, tmp_path / "never")
    assert not (tmp_path / "never").exists()


# ----- real_lm: SmolLM2 as the base, a standard scale only (issue 17) ------------------------------------------
SMOLLM2_SHAPE = {"n_layers": 30, "d_model": 576, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64, "mlp_dim": 1536}


def closed_form_count(method: str, options: dict) -> int:
    """The method class's own closed-form trainable count (`expected_num_trainable`) at SmolLM2's shape, without
    loading the model (the slow smoke test checks the parameters themselves)."""
    from types import SimpleNamespace

    from ctxtune.methods import get_method_class

    cls = get_method_class(method)
    m = cls.__new__(cls)
    m.__dict__.update(model=SimpleNamespace(cfg=SimpleNamespace(**SMOLLM2_SHAPE)), n_adapters=1,
                      config=cls.config_cls.from_dict(options, method=method))
    return m.expected_num_trainable()


def test_real_lm_spec_equal_budgets_same_schedule() -> None:
    spec = get_study("real_lm")
    assert spec.group == "beyond" and spec.scales == ("standard",)
    assert spec.bases["smollm2"].source == "smollm2"
    trained = {a.name: a for a in spec.adaptations.values() if a.method != "none"}
    assert sorted({a.method for a in trained.values()}) == ["lora", "prefix", "prefix_kv", "soft_prompt"]
    assert sorted({a.tasks for a in trained.values()}) == [("lm_copy",), ("lm_permute",)]
    counts = {a.name: closed_form_count(a.method, a.scales["standard"].options) for a in trained.values()}
    assert set(counts.values()) == {34_560}, counts
    schedules = {json.dumps({k: v for k, v in a.scales["standard"].train.items() if k != "lr"}, sort_keys=True)
                 for a in trained.values()}
    assert len(schedules) == 1  # same steps, batch, schedule and evaluation for every method
    assert spec.scales and all(a.scales["standard"].options.get("precompute") for a in trained.values()
                               if a.method == "soft_prompt")
    as_is = spec.adaptations["as_is"]
    assert as_is.method == "none" and {"lm_copy_shown", "lm_permute_told"} <= set(as_is.eval_tasks)
    assert {c.id for c in spec.claims} >= {"elicit", "new_attention"}


def test_reproduce_skips_a_study_without_the_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group's run leaves out a study that lacks the scale (real_lm has only `standard`) and says so; naming it
    with --only at that scale is a one-line error. Nothing is trained here: the plan is captured."""
    import ctxtune.experiments.pipeline as pipeline

    plans = []

    def capture(out, plan, executor, jobs=None, **kw):  # noqa: ANN001, ANN003, ANN202
        plans.append(plan)
        return {"doc": {"jobs": {"ok": 0, "failed": 0, "skipped": 0, "total": 0}, "runs": [], "studies": {}},
                "paths": {}, "wall_seconds": 0.0}

    monkeypatch.setattr(pipeline, "run_plan", capture)
    summary = reproduce(scale="quick", seeds=1, out=tmp_path, group="beyond", executor="local", quiet=True)
    assert set(plans[0]["studies"]) == {"suffix_vs_prefix", "diagnose_validation"}
    assert summary["skipped_studies"] == {"real_lm": "no quick scale (it has standard)"}
    assert not any(j["id"].startswith("real_lm/") for j in plans[0]["jobs"])
    default = reproduce(scale="quick", seeds=1, out=tmp_path / "paper", executor="local", quiet=True)
    assert default["skipped_studies"] == {} and "real_lm" not in plans[1]["studies"]
    with pytest.raises(ConfigError, match="has no scale 'quick'") as err:
        reproduce(scale="quick", seeds=1, only=["real_lm"], out=tmp_path / "only", executor="local", quiet=True)
    assert "\n" not in str(err.value)


def test_a_rerun_that_finds_everything_stored_keeps_the_folders_wall_time(tmp_path: Path) -> None:
    from ctxtune.experiments.executors import LocalExecutor
    from ctxtune.experiments.pipeline import run_plan

    jobs = expand([get_study("cannot_learn_new_attention")], "quick", 1, tmp_path, train_override={"steps": 2},
                  eval_examples=8)
    study = {"title": "t", "paper_ref": "", "summary": "", "bases": {}, "adaptations": {}, "rows": [], "paper": {},
             "claims": []}
    plan = {"kind": "reproduce", "scale": "quick", "seeds": [0], "studies": {"cannot_learn_new_attention": study},
            "jobs": jobs}
    first = run_plan(tmp_path, dict(plan), LocalExecutor(), quiet=True)
    assert first["stored"] == 0 and first["wall_seconds"] > 0
    again = run_plan(tmp_path, dict(plan), LocalExecutor(), quiet=True)
    assert again["stored"] == len(jobs)
    recorded = json.loads((tmp_path / "plan.json").read_text())["wall_seconds"]
    assert recorded >= first["wall_seconds"]  # the folder's time, not the 0 s of a rerun that trained nothing
    assert again["doc"]["wall_seconds"] == recorded


def test_an_interrupted_run_still_records_its_wall_time(tmp_path: Path) -> None:
    """Ctrl-C during a reproduce: plan.json keeps the seconds spent, so the resumed folder's wall time counts them."""
    from ctxtune.experiments.executors import LocalExecutor
    from ctxtune.experiments.pipeline import run_plan

    class Interrupted(LocalExecutor):
        def run(self, *args: object, **kwargs: object) -> dict:
            import time

            time.sleep(0.3)
            raise KeyboardInterrupt

    jobs = expand([get_study("cannot_learn_new_attention")], "quick", 1, tmp_path, train_override={"steps": 2},
                  eval_examples=8)
    plan = {"kind": "reproduce", "scale": "quick", "seeds": [0], "studies": {}, "jobs": jobs}
    with pytest.raises(KeyboardInterrupt):
        run_plan(tmp_path, dict(plan), Interrupted(), quiet=True)
    assert json.loads((tmp_path / "plan.json").read_text())["wall_seconds"] >= 0.3


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("examples", -3, "options.examples must be an integer from 1 to 100,000"),
    ("examples", 10**9, "options.examples must be an integer from 1 to 100,000"),
    ("examples", 2.5, "options.examples must be an integer"),
    ("data_seed", -1, "options.data_seed must be an integer from 0"),
])
def test_bad_analysis_counts_are_refused(key: str, value: object, needle: str) -> None:
    data = _raw("suffix_vs_prefix")
    data["analyses"]["decomposition_desc_1l"]["options"][key] = value
    with pytest.raises(ConfigError, match=needle):
        parse_study(data, "suffix_vs_prefix")


def test_bad_real_lm_analysis_options_are_refused() -> None:
    data = _raw("real_lm")
    name = next(n for n, an in data["analyses"].items() if an["kind"] == "identity")
    data["analyses"][name].setdefault("options", {})["tokens"] = 0
    with pytest.raises(ConfigError, match="options.tokens must be an integer from 1"):
        parse_study(data, "real_lm")
    data["analyses"][name]["options"].update(tokens=12, dtype="float16")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        parse_study(data, "real_lm")
