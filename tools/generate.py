"""Continue a prompt with a trained GPT checkpoint and print the generated text.

    python tools/generate.py --load checkpoints/gpt --prompt "The history of" --max-new-tokens 32 --greedy
    python tools/generate.py --load checkpoints/gpt --prompt "Once" --temperature 0.8 --top-p 0.9 --seed 7
    torchrun --nproc_per_node 2 tools/generate.py --load ckpt_tp2 --tensor-model-parallel-size 2 --prompt ...

The model and tokenizer settings come from the checkpoint's saved args (--vocab-file, --merge-file and
--tokenizer-model override stored tokenizer paths that have moved). Each --prompt (the flag may be
repeated) is continued by up to --max-new-tokens tokens with a KV cache; generation stops early at the
end-of-document token unless --no-stop-at-eod. Token choice: --greedy (argmax, the same as --top-k 1), or
sampling from softmax(logits / --temperature) restricted by --top-k K or --top-p P, reproducible with
--seed. Global rank 0 prints the continuation of each prompt (prompt excluded; with --print-prompt,
prompt and continuation), one block per prompt separated by blank lines, on stdout; loading messages go
to stderr. A user error (no checkpoint, wrong TP size, prompt too long for the model) prints one line
and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.checkpointing import CheckpointError  # noqa: E402
from megatron.text_generation import (  # noqa: E402
    GenerationError,
    SamplingParams,
    add_inference_args,
    end_of_document_id,
    generate_and_post_process,
    inference_args,
    load_model_for_inference,
)
from megatron.tokenizer import TokenizerConfigError  # noqa: E402


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_inference_args(parser)
    g = parser.add_argument_group("generation")
    g.add_argument("--prompt", action="append", required=True, help="Text to continue (repeat for a batch).")
    g.add_argument("--max-new-tokens", type=int, default=64, help="Most tokens generated per prompt.")
    g.add_argument("--greedy", action="store_true", help="Always take the most likely token.")
    g.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (> 0).")
    g.add_argument("--top-k", type=int, default=0, help="Sample among the K most likely tokens (0: all).")
    g.add_argument("--top-p", type=float, default=0.0, help="Sample from the nucleus of mass P (0: off).")
    g.add_argument("--add-bos", action="store_true", help="Start each prompt with the end-of-document token.")
    g.add_argument(
        "--no-stop-at-eod",
        action="store_false",
        dest="stop_at_eod",
        help="Keep generating after the end-of-document token.",
    )
    g.add_argument("--print-prompt", action="store_true", help="Print the prompt before its continuation.")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature > 0.0:
        parser.error(f"--temperature must be positive, got {args.temperature}")
    if args.top_k < 0 or not 0.0 <= args.top_p <= 1.0:
        parser.error(f"--top-k must be >= 0 and --top-p in [0, 1], got {args.top_k} and {args.top_p}")
    if args.top_k > 0 and args.top_p > 0.0:
        parser.error("--top-k and --top-p cannot be combined")
    if args.greedy and (args.top_k > 1 or args.top_p > 0.0):
        parser.error("--greedy cannot be combined with --top-k or --top-p")
    top_k = 1 if args.greedy else args.top_k
    args.sampling = SamplingParams(temperature=args.temperature, top_k=top_k, top_p=args.top_p)
    return args


def _fail(message: str) -> NoReturn:
    """Exit with status 1; only global rank 0 prints the message (every rank meets the same error)."""
    if int(os.environ.get("RANK", "0")) == 0:
        raise SystemExit(f"error: {message}")
    raise SystemExit(1)


def main(argv: Optional[list[str]] = None) -> list[str]:
    """Generate and print; returns the printed texts (on every rank)."""
    cli = get_args(argv)
    try:
        args = inference_args(cli)
        model, tokenizer, parallel = load_model_for_inference(args)
        response = generate_and_post_process(
            model,
            tokenizer,
            parallel,
            cli.prompt,
            cli.max_new_tokens,
            cli.sampling,
            seed=cli.seed,
            add_bos=cli.add_bos,
            stop_on_eod=cli.stop_at_eod,
            max_sequence_length=args.max_position_embeddings,
        )
    except (CheckpointError, TokenizerConfigError, GenerationError) as e:
        _fail(str(e))
    eod = end_of_document_id(tokenizer)
    texts = []
    for prompt, tokens, prompt_length in zip(cli.prompt, response.tokens, response.prompt_lengths):
        generated = tokens[prompt_length:]
        if cli.stop_at_eod and generated and generated[-1] == eod:
            generated = generated[:-1]
        continuation = tokenizer.detokenize(generated)
        texts.append(prompt + continuation if cli.print_prompt else continuation)
    if parallel.is_first_rank:
        print("\n\n".join(texts), flush=True)
    return texts


if __name__ == "__main__":
    main()
