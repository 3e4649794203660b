"""Paper-scale training throughput on CUDA: the 4-layer/4-head/d=256 model at batch 64 per adapter.

    python benchmarks/gpu.py [--out DIR] [--seconds S] [--quick]

Measures, on one GPU in fp32 (whether TF32 matmuls were allowed is recorded as `tf32`), examples/s
of: full training (the paper's pretraining), one prefix (P=10), prefix banks (K = 1, 8, 32, 128),
rank-1 LoRA banks (the paper's Section 6 placement) and the minGPT-style baseline loop; plus a large
matmul's FLOP/s and the utilisation of full training. Prints one JSON object and writes
DIR/gpu_results.json. Skips cleanly (exit 0, {"skipped": ...}) without CUDA. Budget: under two minutes
on an H100/H200 (each contender is timed for about `--seconds` after a warm-up).

Note: our Trainer draws its task batches on the CPU each step (the tasks' generators are CPU torch code)
and the trainer moves nothing to the GPU itself, so this script wraps the task to move each batch to
the device; the baseline samples from a pool already on the device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

SIZE = {"n_layers": 4, "n_heads": 4, "d_model": 256}
BATCH = 64


class DeviceTask:
    """Wraps a ctxtune task so its batches land on `device` (the generators stay on the CPU)."""

    def __init__(self, task: Any, device: torch.device) -> None:
        self.task, self.device = task, device

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def make_batch(self, *args: Any, **kwargs: Any) -> Any:
        from ctxtune.tasks import Batch

        b = self.task.make_batch(*args, **kwargs)
        d = self.device
        return Batch(b.tokens.to(d, non_blocking=True), b.loss_mask.to(d, non_blocking=True), b.n_prompt,
                     b.task_index)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)


def time_steps(step: Any, seconds: float, device: torch.device) -> float:
    """Seconds per step after 3 warm-up steps, timed for about `seconds` (synchronised)."""
    for _ in range(3):
        step()
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    n = max(3, int(seconds / max(time.perf_counter() - t0, 1e-4)))
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n


def ours(method: str, k: int, device: torch.device, **opts: Any) -> Any:
    from ctxtune.limits import MAX_STEPS
    from ctxtune.methods import make_method
    from ctxtune.model import GPT, ModelConfig
    from ctxtune.tasks import get_task
    from ctxtune.train.config import TrainConfig
    from ctxtune.train.trainer import Trainer, make_streams

    full = method == "full"
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SIZE, n_ctx=32, d_vocab=10, dropout=0.1 if full else 0.0)).to(device)
    m = make_method(method, model, n_adapters=k, **opts).to(device)
    cfg = TrainConfig(steps=MAX_STEPS, batch_size=BATCH, lr=5e-4 if full else 1e-2, weight_decay=0.1 if full else 0.01,
                      decay_matrices_only=full, train_mode=full, eval_examples=64)
    task = DeviceTask(get_task("ascending"), device)
    trainer = Trainer(m, make_streams([task] * k, seed=0), cfg, quiet=True)  # type: ignore[list-item]
    model.train(full)
    return trainer.train_step


def baseline(device: torch.device, prefix: int = 0) -> Any:
    from baseline_mingpt import MinGPT, MinGPTConfig, MinGPTTrainer, PoolDataset

    from ctxtune.tasks import get_task

    torch.manual_seed(0)
    model = MinGPT(MinGPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=32)).to(device)
    data = get_task("ascending").make_batch(8192, torch.Generator().manual_seed(0), "train", placeholders=prefix)
    p = torch.randn(4, prefix, 256, device=device) if prefix else None
    ds = PoolDataset(data.tokens.to(device), data.loss_mask.to(device))
    return MinGPTTrainer(model, ds, BATCH, 5e-4 if p is None else 1e-2, p).step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per contender")
    parser.add_argument("--quick", action="store_true", help="K up to 8 only, 1 s per contender")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only to test this script")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        doc: dict[str, Any] = {"skipped": "no CUDA device"}
        print(json.dumps(doc))
        return 0
    device = torch.device(args.device)
    seconds = min(1.0, args.seconds) if args.quick else args.seconds
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (script test)"
    doc = {"device": name, "torch": torch.__version__,
           "cuda": torch.version.cuda, "tf32": torch.backends.cuda.matmul.allow_tf32, "batch_per_adapter": BATCH,
           "model": SIZE, "rows": []}
    ks = [1, 8] if args.quick else [1, 8, 32, 128]
    contenders: list[tuple[str, int, Any]] = [
        ("baseline full", 1, lambda: baseline(device)),
        ("ours full", 1, lambda: ours("full", 1, device)),
        ("baseline prefix P=10", 1, lambda: baseline(device, 10)),
    ]
    contenders += [(f"ours prefix P=10 K={k}", k, lambda k=k: ours("prefix", k, device, n_virtual=10)) for k in ks]
    contenders += [(f"ours lora r=1 K={k}", k, lambda k=k: ours("lora", k, device, rank=1)) for k in ks]
    for name, k, build in contenders:
        try:
            t = time_steps(build(), seconds, device)
            doc["rows"].append({"contender": name, "K": k, "ms_per_step": round(1000 * t, 3),
                                "examples_per_s": round(k * BATCH / t, 1)})
        except Exception as e:  # keep the other rows
            doc["rows"].append({"contender": name, "K": k, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(doc["rows"][-1]), file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    peak = 2 * n**3 / time_steps(lambda: a @ b, 1.0, device)
    doc["matmul_tflops_fp32"] = round(peak / 1e12, 2)
    eps = {r["contender"]: r.get("examples_per_s") for r in doc["rows"]}
    if eps.get("ours full"):
        d, L, T = 256, 4, 19
        flops_per_example = 6 * (L * 12 * d * d + d * 10) * T + 12 * L * T * T * d
        doc["utilisation_full"] = round(eps["ours full"] * flops_per_example / peak, 4)
    ratios = {}
    for k in ks:
        for kind, base in (("prefix P=10", "ours prefix P=10 K=1"), ("lora r=1", "ours lora r=1 K=1")):
            mine, one = eps.get(f"ours {kind} K={k}"), eps.get(base)
            if mine and one:
                ratios[f"{kind} K={k} vs K=1"] = round(mine / one, 2)
    if eps.get("ours prefix P=10 K=32") and eps.get("baseline prefix P=10"):
        bank = eps["ours prefix P=10 K=32"] / eps["baseline prefix P=10"]
        ratios["prefix bank K=32 vs baseline prefix"] = round(bank, 2)
    if eps.get("ours full") and eps.get("baseline full"):
        ratios["full single-run vs baseline"] = round(eps["ours full"] / eps["baseline full"], 2)
    doc["ratios"] = ratios
    doc["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
