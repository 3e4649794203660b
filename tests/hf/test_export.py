"""`ctxtune export`: ctxtune GPT -> GPT-2 folder (transformers), prefix / soft prompt -> PEFT folder (peft).

The round trip: a tiny ctxtune GPT saved as a pretrain run, exported to GPT-2; a prefix or soft prompt
trained a few steps on it, exported to PEFT; PEFT loads it onto the exported GPT-2 and must give
ctxtune's logits in float32 and float64. Plus the conversions of the "keep" policy and the refusals.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ctxtune.errors import CtxtuneError
from ctxtune.hf.export import ExportRefused, export_gpt2, export_peft, gpt2_files, peft_prompt_embeddings
from ctxtune.methods import Method, make_method
from ctxtune.model import GPT, ModelConfig
from ctxtune.train import RunSpec, StreamSpec, TrainConfig
from ctxtune.train.runs import load_run_model, save_run

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.hf

BASE = dict(n_layers=2, n_heads=4, d_model=32, n_ctx=24, d_vocab=13)


# ----- helpers ----------------------------------------------------------------------------------------
def _gpt(seed: int = 0, **kw: Any) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**BASE, **kw})).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping cannot hide behind 1s and 0s
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _pretrain_run(folder: Path, model: GPT) -> Path:
    spec = RunSpec("pretrain", "full", (StreamSpec("ascending"),), TrainConfig(steps=1), model=model.cfg)
    return save_run(folder, spec, model.cfg, make_method("full", model))


def _train_a_few_steps(method: Method, steps: int = 5) -> None:
    """Adam on next-token loss over random sequences: the adapter moves away from its initialisation."""
    opt = torch.optim.Adam(method.trainable_parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(7)
    cfg = method.model.cfg
    ids = torch.arange(method.n_adapters).repeat_interleave(2) if method.n_adapters > 1 else None
    for _ in range(steps):
        tokens = torch.randint(0, cfg.d_vocab, (2 * method.n_adapters, 8), generator=gen)
        logits = method(tokens, ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.d_vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _tune_run(folder: Path, base_run: Path, key: str, n_adapters: int = 1, **options: Any) -> tuple[Path, Method]:
    method = make_method(key, load_run_model(base_run), n_adapters=n_adapters, **options)
    _train_a_few_steps(method)
    streams = tuple(StreamSpec("ascending", index=k) for k in range(n_adapters))
    spec = RunSpec("tune", key, streams, TrainConfig(steps=1), options=options, base=str(base_run))
    return save_run(folder, spec, method.model.cfg, method), method


def _load_gpt2(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    return transformers.GPT2LMHeadModel.from_pretrained(str(folder), dtype=dtype, attn_implementation="eager").eval()


def _peft_logits(gpt2: Path, adapter: Path, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.PeftModel.from_pretrained(_load_gpt2(gpt2, dtype), str(adapter)).eval()
        with torch.no_grad():
            return wrapped(input_ids=tokens).logits[:, -tokens.shape[1] :]  # prompt tuning: P extra rows first


def _ours(method: Method, tokens: torch.Tensor, dtype: torch.dtype, ids: torch.Tensor | None = None) -> torch.Tensor:
    import copy

    twin = copy.deepcopy(method)
    twin.model.to(dtype)
    twin.to(dtype)
    with torch.no_grad():
        return twin(tokens, ids)


TOKENS = torch.randint(0, 13, (3, 9), generator=torch.Generator().manual_seed(3))


# ----- GPT-2 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"act": "relu", "tie_embeddings": True, "d_mlp": 40},
        {"bias": False, "pos": "none", "mlp": False},
    ],
    ids=["gelu-untied", "relu-tied", "nobias-nopos-nomlp"],
)
def test_gpt2_export_gives_the_same_logits(tmp_path: Path, kw: dict) -> None:
    model = _gpt(**kw)
    result = export_gpt2(model, tmp_path / "gpt2")
    assert sorted(p.name for p in (tmp_path / "gpt2").iterdir()) == ["config.json", "model.safetensors"]
    assert result.check is not None and result.check["passed"]
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        hf = _load_gpt2(tmp_path / "gpt2", dtype)
        with torch.no_grad():
            diff = (model.to(dtype)(TOKENS) - hf(input_ids=TOKENS).logits).abs().max().item()
        assert diff <= tol, (dtype, diff)
    assert (tmp_path / "gpt2" / "config.json").read_text().count('"model_type": "gpt2"') == 1


@pytest.mark.parametrize(
    "kw, reason",
    [
        ({"pos": "rotary"}, "rotary"),
        ({"norm": "rmsnorm"}, "RMSNorm"),
        ({"norm": "none"}, "no norms"),
        ({"attn_norm": False}, "no pre-attention norm"),
        ({"residual": False}, "no residual"),
        ({"d_head": 4}, "d_head = d_model / n_heads"),
    ],
)
def test_gpt2_refuses_what_it_cannot_express(tmp_path: Path, kw: dict, reason: str) -> None:
    with pytest.raises(ExportRefused, match=reason):
        export_gpt2(_gpt(**kw), tmp_path / "gpt2")
    assert not (tmp_path / "gpt2").exists() and list(tmp_path.iterdir()) == []


# ----- the full round trip ------------------------------------------------------------------------------
ROUND_TRIPS = [
    ("prefix_kv", {"n_virtual": 3, "position_policy": "shift"}),
    ("prefix_kv", {"n_virtual": 2, "position_policy": "shift", "reparam_dim": 6}),
    ("prefix", {"n_virtual": 2, "position_policy": "shift"}),
    ("soft_prompt", {"n_virtual": 4, "position_policy": "shift"}),
]


@pytest.mark.parametrize("key, options", ROUND_TRIPS, ids=lambda v: v if isinstance(v, str) else str(len(v)))
def test_round_trip_ctxtune_to_gpt2_and_peft(tmp_path: Path, cli: Callable, key: str, options: dict) -> None:
    base_run = _pretrain_run(tmp_path / "pretrain", _gpt())
    tune_run, method = _tune_run(tmp_path / "tune", base_run, key, **options)
    res = cli(["export", "gpt2", "--run", str(base_run), "--out", str(tmp_path / "gpt2"), "--json"])
    assert res.code == 0, res.stderr
    res = cli(["export", "peft", "--run", str(tune_run), "--out", str(tmp_path / "peft"), "--json",
               "--base-model", str(tmp_path / "gpt2")])
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["check"]["passed"] and report["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "gpt2")
    plain = _load_gpt2(tmp_path / "gpt2", torch.float64)(input_ids=TOKENS).logits
    diffs = {}
    for dtype in (torch.float64, torch.float32):
        theirs = _peft_logits(tmp_path / "gpt2", tmp_path / "peft", TOKENS, dtype)
        diffs[dtype] = (_ours(method, TOKENS, dtype) - theirs).abs().max().item()
        assert (theirs.double() - plain).abs().max() > 1e-2  # the adapter changes the logits
    computed = key == "prefix" or options.get("reparam_dim")
    assert diffs[torch.float64] <= (1e-6 if computed else 1e-12), diffs  # computed keys: rounded once to float32
    assert diffs[torch.float32] <= 1e-6, diffs


def test_bank_exports_the_chosen_adapter(tmp_path: Path, cli: Callable) -> None:
    base_run = _pretrain_run(tmp_path / "pretrain", _gpt())
    tune_run, method = _tune_run(tmp_path / "tune", base_run, "prefix_kv", n_adapters=2, n_virtual=2,
                                 position_policy="shift")
    for index in (0, 1):
        out = tmp_path / f"peft{index}"
        assert cli(["export", "peft", "--run", str(tune_run), "--out", str(out), "--index", str(index)]).code == 0
    assert cli(["export", "gpt2", "--run", str(base_run), "--out", str(tmp_path / "gpt2")]).code == 0
    for index in (0, 1):
        theirs = _peft_logits(tmp_path / "gpt2", tmp_path / f"peft{index}", TOKENS, torch.float64)
        ours = _ours(method, TOKENS, torch.float64, torch.full((3,), index))
        assert (ours - theirs).abs().max() <= 1e-12
    res = cli(["export", "peft", "--run", str(tune_run), "--out", str(tmp_path / "x"), "--index", "2"])
    assert res.code == 2 and "--index 2 is out of range" in res.stderr and not (tmp_path / "x").exists()


# ----- positions: "keep" ------------------------------------------------------------------------------
def test_rotary_keep_prefix_is_converted_exactly() -> None:
    """Keys rotated by P under PEFT's shifted content give the keep run's logits (checked within ctxtune:
    GPT-2 has no rotary model to load them onto)."""
    model = _gpt(pos="rotary").double()
    keep = make_method("prefix_kv", model, n_virtual=3, position_policy="keep", init_std=1.0)
    emb, notes, computed = peft_prompt_embeddings(keep, 0)
    assert computed and any("rotated by position 3" in n for n in notes)
    shift = make_method("prefix_kv", model, n_virtual=3, position_policy="shift")
    with torch.no_grad():
        shift.kv[0] = emb  # PEFT's layout is ctxtune's prefix_kv table: [P, n_layers * 2 * n_heads * d_head]
        diff = (keep(TOKENS) - shift(TOKENS)).abs().max().item()
        unconverted = make_method("prefix_kv", model, n_virtual=3, position_policy="shift")
        unconverted.kv[0] = keep.kv[0]
        naive = (keep(TOKENS) - unconverted(TOKENS)).abs().max().item()
    assert diff <= 1e-12 and naive > 1e-3, (diff, naive)


def test_no_positions_keep_exports_as_is(tmp_path: Path) -> None:
    model = _gpt(pos="none")
    for key in ("prefix_kv", "soft_prompt"):
        method = make_method(key, model, n_virtual=2, position_policy="keep")
        result = export_peft(method, tmp_path / key)
        assert result.check is not None and result.check["passed"] and result.check["max_abs_diff"] <= 1e-12


@pytest.mark.parametrize(
    "pos, key, reason",
    [
        ("learned", "prefix_kv", "learned absolute positions"),
        ("learned", "soft_prompt", "learned absolute positions"),
        ("learned", "prefix", "learned absolute positions"),
        ("rotary", "soft_prompt", "rotates the virtual tokens' own keys"),
    ],
)
def test_keep_is_refused_where_no_adapter_is_exact(tmp_path: Path, pos: str, key: str, reason: str) -> None:
    method = make_method(key, _gpt(pos=pos), n_virtual=2, position_policy="keep")
    with pytest.raises(ExportRefused, match=reason):
        export_peft(method, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_weight_methods_are_refused(tmp_path: Path) -> None:
    method = make_method("lora", _gpt(), rank=2)
    with pytest.raises(ExportRefused, match="no PEFT prompt-learning counterpart"):
        export_peft(method, tmp_path / "peft")


def test_rotary_base_is_not_checked_but_says_so(tmp_path: Path) -> None:
    method = make_method("prefix_kv", _gpt(pos="rotary"), n_virtual=2, position_policy="shift")
    result = export_peft(method, tmp_path / "peft")
    assert result.check is None and any("not checked" in n and "rotary" in n for n in result.notes)
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


# ----- the command line ---------------------------------------------------------------------------------
def test_help_has_an_example(cli: Callable) -> None:
    for sub in ("gpt2", "peft"):
        res = cli(["export", sub, "--help"])
        assert res.code == 0 and "Example: ctxtune export " in res.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, cli: Callable) -> None:
    res = cli(["export", "gpt2", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert res.code == 2 and res.stderr.count("\n") == 1 and "run folder not found" in res.stderr
    rotary = _pretrain_run(tmp_path / "rotary", _gpt(pos="rotary"))
    res = cli(["export", "gpt2", "--run", str(rotary), "--out", str(tmp_path / "o")])
    assert res.code == 2 and res.stderr.count("\n") == 1 and "rotary" in res.stderr and res.stdout == ""
    res = cli(["export", "peft", "--run", str(rotary), "--out", str(tmp_path / "o")])
    assert res.code == 2 and "method 'full' has no PEFT" in res.stderr
    assert not (tmp_path / "o").exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path, cli: Callable) -> None:
    run = _pretrain_run(tmp_path / "run", _gpt())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli(["export", "gpt2", "--run", str(run), "--out", str(out)])
    assert res.code == 2 and "--overwrite" in res.stderr and (out / "keep.txt").read_text() == "mine"
    res = cli(["export", "gpt2", "--run", str(run), "--out", str(out), "--overwrite"])
    assert res.code == 0 and sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"], "no temporary folder left behind"


def test_json_is_one_object_and_text_names_the_check(tmp_path: Path, cli: Callable) -> None:
    run = _pretrain_run(tmp_path / "run", _gpt())
    res = cli(["export", "gpt2", "--run", str(run), "--out", str(tmp_path / "a"), "--json"])
    report = json.loads(res.stdout)
    assert res.code == 0 and res.stdout.count("\n") == 1
    assert report["kind"] == "gpt2" and report["check"]["dtype"] == "float64" and report["check"]["passed"]
    res = cli(["export", "gpt2", "--run", str(run), "--out", str(tmp_path / "b"), "--no-check"])
    assert res.code == 0 and "checked against" not in res.stdout and "wrote" in res.stdout


def test_lora_run_model_export_says_the_adapter_is_not_included(tmp_path: Path, cli: Callable) -> None:
    base_run = _pretrain_run(tmp_path / "pretrain", _gpt())
    tune_run, _ = _tune_run(tmp_path / "tune", base_run, "lora", rank=2)
    res = cli(["export", "gpt2", "--run", str(tune_run), "--out", str(tmp_path / "gpt2")])
    assert res.code == 0 and "its base model is exported" in res.stdout
    res = cli(["export", "peft", "--run", str(tune_run), "--out", str(tmp_path / "peft")])
    assert res.code == 2 and "no PEFT prompt-learning counterpart" in res.stderr


def test_a_failed_check_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctxtune.hf.export as ex

    real = ex.gpt2_state_dict

    def wrong(model: GPT) -> dict[str, torch.Tensor]:
        state = real(model)
        state["transformer.ln_f.bias"] = state["transformer.ln_f.bias"] + 1.0
        return state

    monkeypatch.setattr(ex, "gpt2_state_dict", wrong)
    with pytest.raises(CtxtuneError, match="export check failed"):
        export_gpt2(_gpt(), tmp_path / "gpt2")
    assert list(tmp_path.iterdir()) == []
    assert gpt2_files(_gpt())  # the files themselves still build
