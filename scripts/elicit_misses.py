"""Where does a trained elicit prefix go wrong? (the numbers in elicit.toml's notes, 2026-12-02)

    python scripts/elicit_misses.py RUN_DIR ADAPTER TASK [--examples 1000]
    python scripts/elicit_misses.py results/quick/runs/elicit/prefix-s2 2 add1

RUN_DIR is an elicit prefix run (a bank of one prefix per task, in the spec's task order: ascending, descending,
add1, add2), ADAPTER the index of the prefix to examine, TASK the task it was trained on. On fresh test examples
(teacher-forced, a different sample from the report's), it prints how many are right, at which output position
the failures first go wrong, whether the first wrong token is what another pretraining task would write there,
and, per layer and head, the attention the prefix takes at the position that predicts the first output token,
on the inputs whose first token is right against those where it is wrong.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch

from ctxtune.errors import CtxtuneError
from ctxtune.tasks import get_task
from ctxtune.theory.attention import prefix_mass
from ctxtune.theory.capture import capture_method
from ctxtune.train.runs import load_run_method
from ctxtune.train.seeds import eval_seed

SKILLS = ("ascending", "descending", "add1", "add2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("adapter", type=int)
    parser.add_argument("task", choices=SKILLS)
    parser.add_argument("--examples", type=int, default=1000)
    args = parser.parse_args()
    if args.examples < 1:
        print(f"error: --examples must be at least 1, got {args.examples}", file=sys.stderr)
        sys.exit(2)
    try:
        method = load_run_method(args.run_dir, adapter=args.adapter)
    except CtxtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    method.model.eval()
    tasks = {name: get_task(name) for name in SKILLS}
    gen = torch.Generator().manual_seed(eval_seed(0) + 12345)  # not the report's evaluation sample
    batch = next(iter(tasks[args.task].make_batches(args.examples, gen, split="test")))
    tokens, n = batch.tokens, batch.n_prompt  # [batch, n_prompt + n_output]
    with torch.no_grad():
        pred = method(tokens[:, :-1], None, n_prompt=n)[:, n - 1 :].argmax(-1)  # [batch, n_output]
        layers = capture_method(method, tokens[:, :-1])
    wrong = pred != tokens[:, n:]  # [batch, n_output]
    failing = wrong.any(1)
    first = wrong.float().argmax(1)[failing]  # first wrong output position of each failing example
    print(f"{args.task}: {int((~failing).sum())}/{len(failing)} right (teacher-forced)")
    print("first wrong output position:", sorted(Counter(first.tolist()).items()))
    print("wrong tokens per failing example:", sorted(Counter(wrong[failing].sum(1).tolist()).items()))
    rows = failing.nonzero().squeeze(1)
    inputs = tokens[:, :n]
    other = {name: int((pred[rows, first] == task._outputs(inputs, None)[rows, first]).sum())
             for name, task in tasks.items() if name != args.task}
    print(f"first wrong token is what another task writes there (of {len(rows)}):", other)
    right_first = ~wrong[:, 0]
    for la in layers:
        alpha = prefix_mass(la)[:, :, n - 1]  # [batch, heads] at the position predicting the first output token
        print(f"layer {la.layer}: prefix attention per head, first token right "
              f"{[round(float(a), 2) for a in alpha[right_first].mean(0)]}, wrong "
              f"{[round(float(a), 2) for a in alpha[~right_first].mean(0)]}")


if __name__ == "__main__":
    main()
