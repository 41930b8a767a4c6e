"""Per-operator CPU time of one training step of our Llama-shaped GPT and of transformers' LlamaForCausalLM,
side by side (the two steps of benchmarks/llama_throughput.py, same preset).

Each of `--steps` rounds profiles one step of each model (alternating which goes first) with torch.profiler;
printed is the mean self time per step of every operator, for both, largest first. Timing both in the same
process in alternation keeps their numbers comparable on a machine whose load changes.

    python benchmarks/llama_profile.py --threads 1 --steps 6
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_throughput import LLAMA_PRESETS, hf_step, ours_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(LLAMA_PRESETS), default="llama-cpu-small")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = LLAMA_PRESETS[args.preset]
    steps = {
        "ours": ours_step(shape, args.vocab_size, "cpu")[1],
        "HF": hf_step(shape, args.vocab_size, "cpu")[1],
    }
    for _ in range(2):  # warm-up
        for step in steps.values():
            step()
    ms = {name: collections.Counter() for name in steps}
    for round_index in range(args.steps):
        for name in list(steps) if round_index % 2 == 0 else list(reversed(steps)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[name]()
            for event in prof.key_averages():
                ms[name][event.key] += event.self_cpu_time_total / 1000 / args.steps
    print(
        f"{args.preset}, threads {args.threads}, mean self CPU ms per step over {args.steps} profiled steps"
    )
    print(f"{'total':60s} {sum(ms['ours'].values()):9.1f} {sum(ms['HF'].values()):9.1f}")
    keys = sorted(set(ms["ours"]) | set(ms["HF"]), key=lambda k: -max(ms["ours"][k], ms["HF"][k]))
    print(f"{'operator':60s} {'ours':>9s} {'HF':>9s}")
    for key in keys[: args.top]:
        print(f"{key[:60]:60s} {ms['ours'][key]:9.1f} {ms['HF'][key]:9.1f}")


if __name__ == "__main__":
    main()
