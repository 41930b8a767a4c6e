"""Greedy generation speed with the KV cache (megatron.text_generation.generate) against recomputing the
whole sequence at every step, on the same randomly initialised GPT, in one run.

    python benchmarks/generation.py                  # 4 layers, hidden 256, vocab 8192, prompt 32, 224 new tokens

Prints tokens/s of each and checks that both chose the same tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron.model import GPTModel, TransformerConfig
from megatron.parallel.state import single_process_state
from megatron.text_generation.generation import generate
from megatron.text_generation.sampling import GREEDY


@torch.no_grad()
def greedy_without_cache(model: GPTModel, prompt: list[int], new_tokens: int) -> list[int]:
    tokens = torch.tensor([prompt])
    for _ in range(new_tokens):
        positions = torch.arange(tokens.size(1)).unsqueeze(0)
        next_token = model(tokens, positions)[:, -1].argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[0, len(prompt) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        padded_vocab_size=args.vocab_size,
        max_position_embeddings=args.prompt_length + args.max_new_tokens,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = GPTModel(config, single_process_state(), parallel_output=False).eval()
    prompt = torch.randint(0, args.vocab_size, (args.prompt_length,)).tolist()
    n = args.max_new_tokens

    start = time.perf_counter()
    out = generate(
        model, [prompt], n, single_process_state(), GREEDY, vocab_size=args.vocab_size, stop_on_eod=False
    )
    cached_s = time.perf_counter() - start
    cached = out.generated()[0]

    start = time.perf_counter()
    full = greedy_without_cache(model, prompt, n)
    full_s = time.perf_counter() - start

    print(
        f"GPT layers {args.num_layers}, hidden {args.hidden_size}, vocab {args.vocab_size}; prompt "
        f"{args.prompt_length}, {n} new tokens, greedy, {torch.get_num_threads()} threads"
    )
    print(f"KV cache               {n / cached_s:8.1f} tokens/s")
    print(f"full forward per token {n / full_s:8.1f} tokens/s")
    print(f"speedup {full_s / cached_s:.1f}x; same tokens: {cached == full}")


if __name__ == "__main__":
    main()
