"""Hostile inputs through the real CLI: one stderr line naming the problem, the promised exit code, no
traceback, nothing unpickled, and the folder tree exactly as it was.

Each case is a row of `CASES`: the issue's group, a name, the arguments, a regex the single stderr line
must match, and optionally the exit code (default 2), a `setup` that prepares the case folder, a
folder whose run lock the test holds meanwhile, `changes_tree` for a failure during valid work (exit 1),
and `lead` for a case that fails until a file the lead owns changes (run as a strict xfail, so it
turns into a failure the moment it passes). Every case runs in a fresh copy of three run folders
(`base`: a finished pretrain run, `tuned`: a prefix run on it, `killed`: a pretrain run killed after its
step-2 checkpoint) plus small hand-made Hugging Face folders, with that copy as the working directory.

To add a case, append a `Case(...)` row. The default run forks each case from a server that imported
ctxtune once (see conftest.py); `test_case_in_a_fresh_process` (slow) runs every case through
`python -m ctxtune.cli` instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ctxtune.io import LOCK_NAME, read_safetensors_header, run_lock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_harness import SRC, UNPICKLED, CliProcess, CliRun, spawn_cli  # noqa: E402

# ----- the three run folders every case starts from ---------------------------------------------
MODEL = ["--layers", "2", "--heads", "4", "--d-model", "64", "--n-ctx", "24"]
SMALL = ["--batch-size", "8", "--eval-examples", "8", "--quiet"]
PRETRAIN = ["pretrain", "--task", "ascending", *MODEL, "--steps", "4", "--checkpoint-every", "2", *SMALL]
TUNE_ANY = ["tune", "--base", "base", "--task", "descending", "--steps", "3", *SMALL]
TUNE = [*TUNE_ANY, "--method", "prefix", "--n-virtual", "1"]
KILL_AFTER_STEP_2 = """
import os, signal
import ctxtune.train.trainer as t
save = t.Trainer.save_checkpoint
def save_then_die(self, *args, **kwargs):
    save(self, *args, **kwargs)
    if self.step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
t.Trainer.save_checkpoint = save_then_die
"""

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 50, "hidden_size": 16,
    "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "max_position_embeddings": 32, "torch_dtype": "float32",
}  # fmt: skip


def llama_weights() -> dict[str, torch.Tensor]:
    """Random weights of the right names and shapes for TINY_LLAMA."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": [50, 16], "model.norm.weight": [16], "lm_head.weight": [50, 16]}
    layer = {"self_attn.q_proj.weight": [16, 16], "self_attn.k_proj.weight": [8, 16],
             "self_attn.v_proj.weight": [8, 16], "self_attn.o_proj.weight": [16, 16],
             "mlp.gate_proj.weight": [32, 16], "mlp.up_proj.weight": [32, 16], "mlp.down_proj.weight": [16, 32],
             "input_layernorm.weight": [16], "post_attention_layernorm.weight": [16]}  # fmt: skip
    shapes |= {f"model.layers.0.{k}": v for k, v in layer.items()}
    return {k: torch.randn(v, generator=g) * 0.02 for k, v in shapes.items()}


def make_hf_folder(folder: Path, config: dict | str = TINY_LLAMA, weights: bytes | None = None, pickle: bool = False):
    """A Hugging Face model folder: config.json, model.safetensors (or the given bytes), optionally a
    pytorch_model.bin (junk: it must never be read)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is None:
        save_file(llama_weights(), str(folder / "model.safetensors"))
    elif weights:
        (folder / "model.safetensors").write_bytes(weights)
    if pickle:
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04junk that must never be unpickled")


@pytest.fixture(scope="module")
def template(cli_process: CliProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, tuned and killed run folders (made by the real CLI) and the HF folders."""
    root = tmp_path_factory.mktemp("hostile-template")
    for argv, prelude, code in [
        ([*PRETRAIN, "--out", "base"], "", 0),
        ([*TUNE, "--out", "tuned"], "", 0),
        ([*PRETRAIN, "--out", "killed"], KILL_AFTER_STEP_2, -signal.SIGKILL),
    ]:
        res = cli_process.run(argv, root, prelude=prelude)
        assert res.code == code, (argv, res.stderr)
    make_hf_folder(root / "hf_ok", pickle=True)
    make_hf_folder(root / "hf_pickle_only", weights=b"", pickle=True)
    make_hf_folder(root / "hf_negative", config={**TINY_LLAMA, "hidden_size": -16})
    make_hf_folder(root / "hf_garbage", weights=os.urandom(4096))
    make_hf_folder(root / "hf_truncated", weights=(root / "hf_ok" / "model.safetensors").read_bytes()[:-100])
    make_hf_folder(root / "hf_bad_json", config="{not json")
    (root / "garbage.gguf").write_bytes(os.urandom(256))
    (root / "a_file").write_text("not a folder\n")
    return root


# ----- case helpers ------------------------------------------------------------------------------
def write(name: str, text: str) -> Callable[[Path], None]:
    """Setup: write a file in the case folder."""
    return lambda root: (root / name).write_text(text)


def edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Setup: load a JSON file of the case folder, change it in place, write it back."""

    def setup(root: Path) -> None:
        data = json.loads((root / name).read_text())
        change(data)
        (root / name).write_text(json.dumps(data))

    return setup


def edit_tensors(
    name: str, change: Callable[[dict[str, torch.Tensor]], None] | None = None, meta: dict[str, str] | None = None,
    drop_meta: bool = False,
) -> Callable[[Path], None]:  # fmt: skip
    """Setup: rewrite a safetensors file of the case folder with changed tensors and/or metadata."""

    def setup(root: Path) -> None:
        path = root / name
        tensors = load_file(str(path))
        old = dict(read_safetensors_header(path).get("__metadata__") or {})
        if change is not None:
            change(tensors)
        save_file(tensors, str(path), metadata=None if drop_meta else {**old, **(meta or {})})

    return setup


def set_all(dtype: torch.dtype | None = None, value: float | None = None) -> Callable[[dict], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        for k, t in tensors.items():
            tensors[k] = t.to(dtype) if dtype is not None else torch.full_like(t, value)  # type: ignore[arg-type]

    return change


def symlink_loop(name: str) -> Callable[[Path], None]:
    """Setup: `name` is a symbolic link to itself."""

    def setup(root: Path) -> None:
        (root / name).symlink_to(name)

    return setup


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        for s in setups:
            s(root)

    return setup


def hf_case(name: str, config: dict | str | None = None,
            change: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Callable[[Path], None]:  # fmt: skip
    """Setup: a Hugging Face folder `name` in the case folder with another config and/or changed weights."""

    def setup(root: Path) -> None:
        make_hf_folder(root / name, config=TINY_LLAMA if config is None else config, weights=b"x")
        weights = llama_weights()
        if change is not None:
            change(weights)
        save_file(weights, str(root / name / "model.safetensors"))

    return setup


SWEEP_OK = ('name = "s"\n[tune]\nbase = "base"\n[tune.train]\nsteps = 2\n[grid]\nseeds = [0]\n'
            'methods = ["prefix"]\ntasks = ["descending"]\n')
SWEEP = ["sweep", "s.toml", "--executor", "local", "--quiet", "--out", "sw"]
RESUME_KILLED = [*PRETRAIN, "--out", "killed", "--resume"]
CKPT = "killed/checkpoint.safetensors"
DEEP_JSON = "[" * 100_000 + "]" * 100_000
LONG = "x" * 300


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    argv: list[str]
    expect: str
    code: int = 2
    setup: Callable[[Path], None] | None = None
    hold_lock: str | None = None
    changes_tree: bool = False
    lead: str = ""
    env: dict[str, str] = field(default_factory=dict)


CASES = [
    # 1: numbers checked where they enter, sizes bounded by memory, counts by stated bounds
    Case("1", "lr_inf", [*PRETRAIN, "--out", "new", "--lr", "inf"], r"--lr must be a finite number"),
    Case("1", "weight_decay_nan", [*PRETRAIN, "--out", "new", "--weight-decay", "nan"], r"--weight-decay .*finite"),
    Case("1", "lora_alpha_nan", [*TUNE_ANY, "--out", "new", "--method", "lora", "--alpha", "nan"], r"--alpha .*finite"),
    Case("1", "lora_alpha_negative", [*TUNE_ANY, "--out", "new", "--method", "lora", "--alpha", "-2"], r"LoRA alpha"),
    Case("1", "grad_clip_nan_toml", [*PRETRAIN, "--out", "new", "--config", "c.toml"], r"train\.grad_clip .*finite",
         setup=write("c.toml", "[train]\ngrad_clip = nan\n")),
    Case("1", "min_lr_ratio_negative_toml", [*PRETRAIN, "--out", "new", "--config", "c.toml"],
         r"train\.min_lr_ratio must be in \[0, 1\]", setup=write("c.toml", "[train]\nmin_lr_ratio = -0.5\n")),
    Case("1", "rotary_base_negative_toml", [*PRETRAIN, "--out", "new", "--config", "c.toml"], r"model\.rotary_base",
         setup=write("c.toml", '[model]\npos = "rotary"\nrotary_base = -1.0\n')),
    Case("1", "betas_inf_toml", [*PRETRAIN, "--out", "new", "--config", "c.toml"], r"train\.betas",
         setup=write("c.toml", "[train]\nbetas = [0.9, inf]\n")),
    Case("1", "init_std_nan_toml", [*TUNE, "--out", "new", "--config", "c.toml"], r"init_std",
         setup=write("c.toml", "[options]\ninit_std = nan\n")),
    Case("1", "lr_times_weight_decay", [*PRETRAIN, "--out", "new", "--lr", "200", "--weight-decay", "0.01"],
         r"lr \* train\.weight_decay must be below 1"),
    Case("1", "d_model_huge", [*PRETRAIN, "--out", "new", "--d-model", "100000000", "--heads", "1"],
         r"needs at least about .* GiB .* more than this machine's .* GiB of memory"),
    Case("1", "steps_beyond_int64", [*PRETRAIN, "--out", "new", "--steps", "99999999999999999999"],
         r"--steps has 20 digits: it does not fit in a 64-bit integer"),
    Case("1", "steps_beyond_bound", [*PRETRAIN, "--out", "new", "--steps", "100000000"],
         r"train\.steps must be at most 10,000,000"),
    Case("1", "seed_beyond_bound", [*PRETRAIN, "--out", "new", "--seed", "10000000000000"], r"train\.seed"),
    Case("1", "eval_examples_beyond_int64", ["eval", "--run", "base", "--task", "ascending", "--examples", "9" * 30],
         r"--examples .*64-bit"),
    Case("1", "construct_unconditional_huge", ["construct", "unconditional", "--vocab", "1000", "--length", "1000"],
         r"construct unconditional --vocab 1000 --length 1000 needs at least about .* of memory"),
    Case("1", "construct_conditional_huge", ["construct", "conditional", "--vocab", "1000", "--length", "1000"],
         r"construct conditional --vocab 1000 --length 1000: .* of memory"),
    Case("1", "check_attention_length_huge", ["check", "attention", "--model", "base", "--length", "1000000000"],
         r"needs at least about .* GiB"),
    Case("1", "check_attention_negative_seed", ["check", "attention", "--model", "base", "--seed", "-1"],
         r"--seed must be an integer from 0 to"),
    Case("1", "construct_negative_seed",
         ["construct", "unconditional", "--vocab", "3", "--length", "2", "--seed", "-4"],
         r"--seed must be an integer from 0 to"),
    Case("1", "check_attention_captures_huge", ["check", "attention", "--model", "base", "--length", "10000000"],
         r"check attention --length 10000000 needs at least about .* GiB"),
    Case("1", "eval_seed_beyond_bound", ["eval", "--run", "base", "--task", "ascending", "--seed", str(9 * 10**18)],
         r"--seed must be from 0 to 1,000,000,000,000"),
    Case("1", "eval_examples_beyond_bound", ["eval", "--run", "base", "--task", "ascending", "--examples", "100000000"],
         r"--examples must be at most 10,000,000"),
    Case("1", "n_virtual_huge", [*TUNE, "--out", "new", "--n-virtual", "100000", "--eval-examples", "3200"],
         r"training prefix .* evaluation cache .* of memory"),
    Case("1", "placeholders_huge", [*PRETRAIN, "--out", "new", "--pos", "rotary", "--placeholders", "200000"],
         r"training full .* of memory"),
    Case("1", "batch_size_huge", [*PRETRAIN, "--out", "new", "--batch-size", "100000000"],
         r"training full .* of memory"),
    Case("1", "warmup_beyond_bound", [*PRETRAIN, "--out", "new", "--warmup", str(2**63 - 1)],
         r"train\.warmup must be at most 10,000,000"),
    Case("1", "approx_p_huge", ["approx", "--p", "1000000000000"], r"a prefix of P=1000000000000 needs at least about"),
    Case("1", "approx_fit_steps_beyond_bound", ["approx", "--mode", "fit", "--fit-steps", "100000000000", "--p", "1"],
         r"fit steps must be an integer in \[0, 10,000,000\]"),
    Case("1", "diagnose_examples_beyond_bound", ["diagnose", "--base", "base", "--task", "descending", "--examples",
         "1000000000"], r"--examples must be at most 10,000,000"),
    Case("1", "completions_length_past_positions", ["completions", "--model", "hf_ok", "--length", "1000000000"],
         r"--length 1000000000 does not fit the model: .* the model has 32"),
    Case("1", "reproduce_seeds_beyond_bound", ["reproduce", "--seeds", "1000000000", "--out", "r"],
         r"--seeds must be from 1 to 1,000"),
    Case("1", "reproduce_eval_examples_zero", ["reproduce", "--eval-examples", "0", "--out", "r"],
         r"--eval-examples must be from 1 to"),
    Case("1", "reproduce_threads_beyond_cores", ["reproduce", "--threads", "100000", "--out", "r"],
         r"--threads must be an integer from 1 to this machine's \d+ CPU"),
    Case("1", "sweep_grid_too_large", SWEEP, r"the sweep expands to 100,000 runs .* at most 10,000",
         setup=write("s.toml", SWEEP_OK.replace("seeds = [0]", f"seeds = {list(range(100_000))}"))),
    Case("1", "sweep_resources_negative", SWEEP, r"resources\.tune\.num_cpus must be a finite number >= 0",
         setup=write("s.toml", SWEEP_OK + "[resources]\ntune = { num_cpus = -1 }\n")),
    # 2: adapter tensors read back
    Case("2", "adapter_int64", ["eval", "--run", "tuned", "--task", "descending"],
         r"tensor 'hidden' in tuned/adapter\.safetensors has dtype int64, expected float32",
         setup=edit_tensors("tuned/adapter.safetensors", set_all(dtype=torch.int64))),
    Case("2", "adapter_all_nan", ["eval", "--run", "tuned", "--task", "descending"],
         r"tensor 'hidden' in tuned/adapter\.safetensors holds NaN",
         setup=edit_tensors("tuned/adapter.safetensors", set_all(value=float("nan")))),
    Case("2", "adapter_wrong_shape", ["eval", "--run", "tuned", "--task", "descending"],
         r"'hidden' in tuned/adapter\.safetensors has shape",
         setup=edit_tensors("tuned/adapter.safetensors", lambda t: t.update(hidden=t["hidden"][:, :, :0]))),
    Case("2", "adapter_garbage", ["eval", "--run", "tuned", "--task", "descending"],
         r"not a valid safetensors file .*tuned/adapter\.safetensors",
         setup=lambda root: (root / "tuned/adapter.safetensors").write_bytes(os.urandom(300))),
    Case("2", "model_weights_inf", ["eval", "--run", "base", "--task", "ascending"],
         r"base/model\.safetensors holds NaN or infinite",
         setup=edit_tensors("base/model.safetensors", set_all(value=float("inf")))),
    # 2: an output never replaces or writes into an input; a flag is never silently ignored
    Case("2", "export_out_is_the_run", ["export", "gpt2", "--run", "base", "--out", "base", "--overwrite",
         "--no-check"], r"--out base is the run folder base: writing there would overwrite it"),
    Case("2", "export_out_contains_the_run", ["export", "gpt2", "--run", "base", "--out", ".", "--overwrite",
         "--no-check"], r"--out \. contains the run folder base"),
    Case("2", "export_out_is_the_base_of_the_run", ["export", "gpt2", "--run", "tuned", "--out", "base",
         "--overwrite", "--no-check"], r"--out base is the base of the run"),
    Case("2", "export_peft_out_inside_the_run", ["export", "peft", "--run", "tuned", "--out", "tuned/peft",
         "--no-check"], r"--out tuned/peft lies inside the run folder tuned"),
    Case("2", "export_over_another_run", ["export", "gpt2", "--run", "base", "--out", "tuned", "--overwrite",
         "--no-check"], r"--out tuned is a ctxtune run folder: choose a folder outside run folders"),
    Case("2", "sweep_out_is_a_run", [*SWEEP[:-1], "tuned"], r"--out tuned is a ctxtune run folder",
         setup=write("s.toml", SWEEP_OK)),
    Case("2", "sweep_out_is_the_base", [*SWEEP[:-1], "hf_ok"], r"--out hf_ok is the base \(tune\.base\) hf_ok",
         setup=write("s.toml", SWEEP_OK.replace('"base"', '"hf_ok"'))),
    Case("2", "reproduce_out_inside_a_run", ["reproduce", "--out", "base/results", "--steps", "1"],
         r"--out base/results lies inside .*base, a ctxtune run folder"),
    Case("2", "approx_out_over_a_run_file", ["approx", "--p", "1", "--targets", "abs", "--out", "base/config.json"],
         r"--out base/config\.json exists and is not a `ctxtune approx` result"),
    Case("2", "check_run_adapter_with_another_model", ["check", "attention", "--model", "hf_ok", "--adapter",
         "tuned"], r"tuned is a ctxtune run on its own base .*; the base given with it \(hf_ok\) is another model"),
    # 3: run-folder integrity
    Case("3", "checkpoint_step_not_a_number", RESUME_KILLED, r"invalid checkpoint killed/checkpoint\.safetensors: "
         r"step 'abc'", setup=edit_tensors(CKPT, meta={"step": "abc"})),
    Case("3", "checkpoint_step_negative", RESUME_KILLED, r"killed/checkpoint\.safetensors: step '-5' is not",
         setup=edit_tensors(CKPT, meta={"step": "-5"})),
    Case("3", "checkpoint_step_too_large", RESUME_KILLED, r"step 9999 is beyond the run's 4 steps",
         setup=edit_tensors(CKPT, meta={"step": "9999"})),
    Case("3", "checkpoint_missing_rng", RESUME_KILLED,
         r"killed/checkpoint\.safetensors: missing tensors \['rng/torch'\]",
         setup=edit_tensors(CKPT, lambda t: t.pop("rng/torch"))),
    Case("3", "checkpoint_rng_wrong_dtype", RESUME_KILLED, r"rng/data/0 must be .* uint8",
         setup=edit_tensors(CKPT, lambda t: t.update({"rng/data/0": t["rng/data/0"].float()}))),
    Case("3", "checkpoint_loss_not_a_list", RESUME_KILLED, r"loss must be a JSON list",
         setup=edit_tensors(CKPT, meta={"loss": "{}"})),
    Case("3", "checkpoint_truncated", RESUME_KILLED, r"killed/checkpoint\.safetensors",
         setup=lambda root: (root / CKPT).write_bytes((root / CKPT).read_bytes()[:-64])),
    Case("3", "checkpoint_of_older_ctxtune", RESUME_KILLED, r"older ctxtune",
         setup=both(edit_tensors(CKPT, drop_meta=True), write("killed/checkpoint.json", '{"step": 2}'))),
    Case("3", "second_writer_refused", RESUME_KILLED, r"run folder killed is in use by another ctxtune process",
         hold_lock="killed"),
    Case("3", "diverged_without_checkpoint", [*PRETRAIN, "--out", "new", "--lr", "1e30", "--weight-decay", "0",
         "--steps", "20", "--checkpoint-every", "0"], r"training diverged: .*no checkpoint was written", code=1,
         changes_tree=True),
    Case("3", "diverged_after_checkpoint", [*PRETRAIN, "--out", "new", "--lr", "1e30", "--weight-decay", "0",
         "--steps", "20", "--checkpoint-every", "1"], r"the last good checkpoint \(step \d+\) is new/checkpoint",
         code=1, changes_tree=True),
    Case("3", "run_config_unknown_top_key", ["eval", "--run", "base", "--task", "ascending"],
         r"invalid run config base/config\.json: unknown key\(s\) in base/config\.json: extra",
         setup=edit_json("base/config.json", lambda c: c.update(extra=1))),
    Case("3", "run_config_base_path_a_number", ["eval", "--run", "tuned", "--task", "descending"],
         r"invalid run config tuned/config\.json: base\.path must be a path",
         setup=edit_json("tuned/config.json", lambda c: c.update(base={"path": 5, "relative": 7}))),
    Case("3", "run_config_base_path_nul", ["eval", "--run", "tuned", "--task", "descending"],
         r"base\.path must be a path \(a non-empty string without NUL bytes\)",
         setup=edit_json("tuned/config.json", lambda c: c.update(base={"path": "a\0b", "relative": None}))),
    # 4: one error boundary
    Case("4", "out_name_too_long", [*PRETRAIN, "--out", LONG], r"File name too long"),
    Case("4", "out_inside_a_file", [*PRETRAIN, "--out", "a_file/run"], r"Not a directory"),
    Case("4", "config_is_a_directory", [*PRETRAIN, "--out", "new", "--config", "base"], r"config file base is a dir"),
    Case("4", "config_nested_too_deep", [*PRETRAIN, "--out", "new", "--config", "c.toml"], r"malformed TOML in c\.toml",
         setup=write("c.toml", "a = " + DEEP_JSON + "\n")),
    Case("4", "config_number_for_a_table", [*PRETRAIN, "--out", "new", "--config", "c.toml"], r"\[model\] .* table",
         setup=write("c.toml", "model = 5\n")),
    Case("4", "config_string_for_a_number", [*PRETRAIN, "--out", "new", "--config", "c.toml"],
         r"train\.lr must be float, got 'fast'", setup=write("c.toml", '[train]\nlr = "fast"\n')),
    Case("4", "run_config_not_json", ["eval", "--run", "base", "--task", "ascending"], r"invalid JSON in base/config",
         setup=write("base/config.json", "{")),
    Case("4", "run_config_nested_too_deep", ["eval", "--run", "base", "--task", "ascending"],
         r"invalid JSON in base/config\.json", setup=write("base/config.json", DEEP_JSON)),
    Case("4", "run_config_string_for_a_size", ["eval", "--run", "base", "--task", "ascending"], r"model\.d_model",
         setup=edit_json("base/config.json", lambda c: c["spec"]["model"].update(d_model="x"))),
    Case("4", "run_config_string_for_placeholders", ["eval", "--run", "base", "--task", "ascending"],
         r"invalid run config base/config\.json: train\.placeholders must be int, got 'x'",
         setup=edit_json("base/config.json", lambda c: c["spec"]["train"].update(placeholders="x"))),
    Case("4", "bench_out_is_a_file", ["bench", "--only", "banks", "--out", "a_file"], r"--out a_file exists and is"),
    Case("4", "completions_out_is_a_folder", ["completions", "--out", "base"], r"--out base is a directory"),
    Case("4", "completions_out_not_results", ["completions", "--out", "a_file"], r"not a `ctxtune completions` res"),
    Case("4", "completions_out_inside_a_file", ["completions", "--out", "a_file/r.jsonl"], r"a_file is not a folder"),
    Case("4", "approx_plot_is_a_folder", ["approx", "--p", "1", "--targets", "abs", "--plot", "base"],
         r"--plot base is a directory"),
    Case("4", "approx_targets_empty", ["approx", "--targets", ",", "--p", "1"], r"no target given"),
    Case("4", "bench_only_unknown", ["bench", "--only", "nope", "--out", "b"], r"unknown benchmark\(s\) \['nope'\]"),
    Case("4", "sweep_spec_is_a_directory", ["sweep", "base"], r"sweep spec base is a directory"),
    # 5: Hugging Face folders: safetensors only, checked before transformers sees them
    Case("5", "hf_pickle_only", ["check", "attention", "--model", "hf_pickle_only"],
         r"hf_pickle_only holds only pickled weights \(pytorch_model\.bin\).*save_pretrained"),
    Case("5", "hf_pickle_only_completions", ["completions", "--model", "hf_pickle_only", "--out", "r.jsonl"],
         r"only pickled weights"),
    Case("5", "hf_negative_hidden_size", ["check", "attention", "--model", "hf_negative"],
         r"hidden_size in hf_negative/config\.json must be a positive integer, got -16"),
    Case("5", "hf_garbage_safetensors", ["check", "attention", "--model", "hf_garbage"],
         r"not a valid safetensors file .*hf_garbage/model\.safetensors"),
    Case("5", "hf_truncated_safetensors", ["check", "attention", "--model", "hf_truncated"],
         r"lies outside the file \(truncated\?\): hf_truncated/model\.safetensors"),
    Case("5", "hf_config_not_json", ["check", "attention", "--model", "hf_bad_json"], r"hf_bad_json/config\.json"),
    Case("5", "hf_rope_theta_nan", ["check", "attention", "--model", "h"], r"rope_theta in h/config\.json must be "
         r"a finite number, got nan", setup=hf_case("h", json.dumps(TINY_LLAMA)[:-1] + ', "rope_theta": NaN}')),
    Case("5", "hf_layers_huge", ["check", "attention", "--model", "h"], r"the model h/config\.json describes needs "
         r"at least about .* GiB", setup=hf_case("h", {**TINY_LLAMA, "num_hidden_layers": 10**9})),
    Case("5", "hf_missing_weight", ["check", "attention", "--model", "h"],
         r"h lacks the weight\(s\) \['model\.norm\.weight'\] that its config\.json describes",
         setup=hf_case("h", change=lambda w: w.pop("model.norm.weight"))),
    Case("5", "hf_weight_wrong_shape", ["check", "attention", "--model", "h"],
         r"tensor 'model\.norm\.weight' in h has shape \[3\], its config\.json gives \[16\]",
         setup=hf_case("h", change=lambda w: w.update({"model.norm.weight": torch.ones(3)}))),
    Case("5", "hf_weights_int64", ["check", "attention", "--model", "h"], r"in h/model\.safetensors has dtype I64",
         setup=hf_case("h", change=lambda w: w.update({k: v.long() for k, v in w.items()}))),
    Case("5", "hf_weight_nan", ["check", "attention", "--model", "h"],
         r"the weight 'model\.norm\.weight' of the model in h holds NaN",
         setup=hf_case("h", change=lambda w: w.update({"model.norm.weight": torch.full((16,), float("nan"))}))),
    Case("5", "hf_heads_do_not_divide_hidden", ["check", "attention", "--model", "h"],
         r"hidden size 16 in h/config\.json does not split over 3 attention heads",
         setup=hf_case("h", config={**TINY_LLAMA, "num_attention_heads": 3, "num_key_value_heads": 1})),
    Case("5", "hf_kv_heads_do_not_divide_heads", ["check", "attention", "--model", "h"],
         r"4 attention heads in h/config\.json do not split over 3 key/value heads",
         setup=hf_case("h", config={**TINY_LLAMA, "num_attention_heads": 4, "num_key_value_heads": 3})),
    Case("5", "config_symlink_loop", [*PRETRAIN, "--out", "new", "--config", "loop.toml"],
         r"config file loop\.toml is a symbolic link that leads nowhere", setup=symlink_loop("loop.toml")),
    Case("5", "run_folder_symlink_loop", ["eval", "--run", "loop", "--task", "ascending"],
         r"run folder loop is a symbolic link that leads nowhere", setup=symlink_loop("loop")),
    Case("5", "adapter_symlink_loop", ["check", "attention", "--model", "hf_ok", "--adapter", "loop"],
         r"--adapter loop is a symbolic link that leads nowhere", setup=symlink_loop("loop")),
    Case("5", "gguf_garbage", ["check", "attention", "--model", "garbage.gguf"], r"garbage\.gguf is not a GGUF file"),
    # 6: specs validated before anything is written
    Case("6", "sweep_method_twice", SWEEP, r"grid\.methods lists 'prefix' twice",
         setup=write("s.toml", SWEEP_OK.replace('["prefix"]', '["prefix", "prefix"]'))),
    Case("6", "sweep_option_value_twice", SWEEP, r"grid\.options\.prefix\.n_virtual lists 1 twice",
         setup=write("s.toml", SWEEP_OK + "[grid.options.prefix]\nn_virtual = [1, 1]\n")),
]  # fmt: skip


# ----- the harness ---------------------------------------------------------------------------------
def tree(root: Path) -> dict[str, tuple]:
    """Every path under root: files with (size, mtime_ns), folders as ("dir",). Left out: run-folder lock
    files (a killed run leaves one; whoever locks the folder next reuses and removes it) and folder
    mtimes (a lock file created and removed changes them)."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        if path.name == LOCK_NAME:
            continue
        st = path.lstat()
        out[str(path.relative_to(root))] = ("dir",) if path.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def prepare(case: Case, template: Path, tmp_path: Path) -> Path:
    root = tmp_path / "case"
    shutil.copytree(template, root, symlinks=True)
    if case.setup is not None:
        case.setup(root)
    return root


def check(case: Case, res: CliRun, before: dict[str, tuple], after: dict[str, tuple]) -> None:
    """The contract: exit code, exactly one stderr line matching `expect`, no traceback, tree unchanged."""
    assert res.code != UNPICKLED, f"{case.name}: something tried to unpickle"
    assert res.code == case.code, f"{case.name}: exit {res.code}, stderr: {res.stderr[-2000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(res.lines) == 1, f"{case.name}: {len(res.lines)} stderr lines: {res.stderr[-2000:]}"
    assert res.lines[0].startswith("error: ") and re.search(case.expect, res.lines[0]), res.lines[0]
    if not case.changes_tree:
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"{case.name}: files changed: {changed[:8]}"


def run_case(case: Case, template: Path, tmp_path: Path, runner: Callable[..., CliRun]) -> None:
    root = prepare(case, template, tmp_path)
    before = tree(root)
    if case.hold_lock is not None:
        with run_lock(root / case.hold_lock):
            before = tree(root)
            res = runner(case.argv, root, case.env)
            after = tree(root)
    else:
        res = runner(case.argv, root, case.env)
        after = tree(root)
    check(case, res, before, after)


def params(cases: list[Case]) -> list:
    marks = lambda c: [pytest.mark.xfail(strict=True, reason=c.lead)] if c.lead else []  # noqa: E731
    return [pytest.param(c, id=f"g{c.group}-{c.name}", marks=marks(c)) for c in cases]


@pytest.mark.parametrize("case", params(CASES))
def test_case(case: Case, template: Path, tmp_path: Path, cli_process: CliProcess) -> None:
    run_case(case, template, tmp_path, lambda argv, cwd, env: cli_process.run(argv, cwd, env))


@pytest.mark.slow
@pytest.mark.parametrize("case", params(CASES))
def test_case_in_a_fresh_process(case: Case, template: Path, tmp_path: Path) -> None:
    run_case(case, template, tmp_path, spawn_cli)


# ----- cases that need more than a row ---------------------------------------------------------------
def test_debug_flag_and_variable_show_the_traceback(template: Path, tmp_path: Path, cli_process: CliProcess) -> None:
    root = prepare(CASES[0], template, tmp_path)
    for argv, env in [(["--debug", *CASES[0].argv], {}), ([*CASES[0].argv, "--debug"], {}),
                      (CASES[0].argv, {"CTXTUNE_DEBUG": "1"})]:  # fmt: skip
        res = cli_process.run(argv, root, env)
        assert res.code == 2 and "Traceback" in res.stderr, res.stderr
        assert res.lines[-1].startswith("error: --lr must be a finite number")


def test_allocation_failure_is_one_clear_line() -> None:
    """torch's allocator failing (a RuntimeError, not MemoryError) is reported as out of memory, exit 2."""
    from ctxtune.commands.common import describe_error

    err = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried")
    code, message = describe_error(err)
    assert code == 2 and message.startswith("out of memory: the command needs more memory than this machine has")


def test_safetensors_loaded_and_pickle_beside_it_never_read(template: Path, cli_process: CliProcess) -> None:
    """hf_ok has model.safetensors and a junk pytorch_model.bin: the check runs (exit 0) and the tripwire
    on torch.load / pickle proves nothing was unpickled."""
    res = cli_process.run(["check", "attention", "--model", "hf_ok", "--json"], template)
    assert res.code == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["passed"] is True


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """SIGINT to a real `python -m ctxtune.cli pretrain` while it trains."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    argv = [*PRETRAIN, "--steps", "100000", "--checkpoint-every", "1", "--out", "run"]
    # As from a terminal: SIGINT at its default even when this test runs in a background job (where a
    # non-interactive shell leaves SIGINT ignored, and the child would inherit that and never see Ctrl-C).
    proc = subprocess.Popen([sys.executable, "-m", "ctxtune.cli", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines() == ["error: interrupted"], err


def test_resuming_a_finished_run_changes_nothing_and_says_so(template: Path, tmp_path: Path,
                                                             cli_process: CliProcess) -> None:
    root = prepare(Case("3", "resume_finished", [], ""), template, tmp_path)
    before = tree(root)
    res = cli_process.run([*PRETRAIN, "--out", "base", "--resume", "--json"], root, {})
    assert res.code == 0 and res.stderr == "", res.stderr
    assert json.loads(res.stdout)["note"] == "the run had already finished; nothing was changed"
    assert tree(root) == before
