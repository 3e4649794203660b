"""`ctxtune construct` and `ctxtune completions`: JSON output, bad input, resume (tiny random Llama)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ctxtune.commands.construct import app as construct_app
from ctxtune.commands.construct import register, run_completions, run_construct
from ctxtune.errors import CtxtuneError

runner = CliRunner()


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_construct_json(cli: typer.Typer) -> None:
    args = ["construct", "unconditional", "--vocab", "3", "--length", "3", "--verify", "--json"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert obj["construction"] == "unconditional" and obj["vocab"] == 3 and obj["length"] == 3
    assert obj["reached"] == obj["total"] == 27
    assert obj["hard_token_completions"] <= 3


def test_construct_conditional_sampled_authors_form() -> None:
    obj = run_construct("conditional", 4, 2, samples=50, seed=1)
    assert obj["reached"] == obj["total"] == 50 and obj["n_targets"] == 4**8
    obj = run_construct("unconditional", 94, 20, samples=20, form="authors", dtype="float32", verify=True)
    assert obj["reached"] == 20 and obj["form"] == "authors" and obj["dtype"] == "float32"


@pytest.mark.parametrize(
    "args",
    [
        ["unconditional", "--vocab", "1", "--length", "3"],
        ["unconditional", "--vocab", "3", "--length", "0"],
        ["conditional", "--vocab", "4", "--length", "3"],
        ["sideways", "--vocab", "3", "--length", "3"],
        ["unconditional", "--vocab", "3", "--length", "3", "--form", "other"],
        ["conditional", "--vocab", "3", "--length", "1", "--form", "authors"],
        ["unconditional", "--vocab", "3", "--length", "3", "--dtype", "float16"],
    ],
)
def test_construct_bad_input_exits_2_with_one_line(cli: typer.Typer, args: list[str]) -> None:
    res = runner.invoke(cli, ["construct", *args, "--json"])
    assert res.exit_code == 2
    assert res.stdout == ""
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1


def test_verify_raises_when_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctxtune.constructions as cons

    real = cons.make_unconditional
    monkeypatch.setattr(cons, "make_unconditional", lambda v, n, **kw: real(v, n, **kw, margin=2.0))  # M < 4
    with pytest.raises(CtxtuneError, match="verification failed"):
        run_construct("unconditional", 5, 3, verify=True)
    assert run_construct("unconditional", 5, 3)["verified"] is False


def test_help_has_example() -> None:
    res = runner.invoke(construct_app, ["construct", "--help"])
    assert res.exit_code == 0 and "Example" in res.stdout
    res = runner.invoke(construct_app, ["completions", "--help"])
    assert res.exit_code == 0 and "Example" in res.stdout


@pytest.fixture(scope="module")
def tiny_llama():  # noqa: ANN201
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64)
    return LlamaForCausalLM(cfg).eval()


def test_greedy_hf_matches_uncached_loop(tiny_llama) -> None:  # noqa: ANN001
    import torch

    from ctxtune.constructions.completions import greedy_hf

    ids = torch.arange(8)
    cached = greedy_hf(tiny_llama, ids, 5)
    seq = ids[:, None]
    for _ in range(5):
        nxt = tiny_llama(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(cached, seq[:, 1:])
    emb = tiny_llama.get_input_embeddings().weight[:8]
    assert torch.equal(greedy_hf(tiny_llama, emb, 5), cached)  # embeddings of the ids give the same


def test_completions_counts_and_resume(tiny_llama, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "c.jsonl"
    first = run_completions("tiny", samples=20, length=4, batch_size=8, out=out, progress=False,
                            lm=tiny_llama)
    for pool in ("hard", "gaussian", "dirichlet"):
        stats = first["pools"][pool]
        assert stats["n"] == 20 and 1 <= stats["unique"] <= 20
    assert first["paper"]["hard"]["unique"] == 24426
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 3 * 3  # header + 3 batches per pool
    # Drop the last batch (a killed run) and corrupt nothing else: the rerun redoes only that batch.
    out.write_text("\n".join(lines[:-1]) + "\n")
    again = run_completions("tiny", samples=20, length=4, batch_size=8, out=out, progress=False,
                            lm=tiny_llama)
    assert again["pools"] == first["pools"]
    assert len(out.read_text().splitlines()) == len(lines)


def test_completions_full_vocab_and_bad_input(tiny_llama, tmp_path: Path) -> None:  # noqa: ANN001
    res = run_completions("tiny", samples=None, length=2, batch_size=32, progress=False, lm=tiny_llama)
    assert res["pools"]["hard"]["n"] == 64 and res["pools"]["hard"]["unique"] <= 64
    with pytest.raises(CtxtuneError):
        run_completions("tiny", samples=65, progress=False, lm=tiny_llama)
    out = tmp_path / "c.jsonl"
    run_completions("tiny", samples=4, length=2, out=out, progress=False, lm=tiny_llama)
    with pytest.raises(CtxtuneError, match="other settings"):
        run_completions("tiny", samples=4, length=3, out=out, progress=False, lm=tiny_llama)


@pytest.mark.slow
def test_smollm2_completions(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    res = run_completions("smollm2", samples=64, length=10, batch_size=64, out=tmp_path / "s.jsonl",
                          progress=False)
    assert res["d_vocab"] == 49152
    assert all(1 <= res["pools"][p]["unique"] <= 64 for p in ("hard", "gaussian", "dirichlet"))
