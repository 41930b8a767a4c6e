"""Serve a trained GPT checkpoint over HTTP with Megatron-LM's text generation API (PUT /api).

    python tools/run_text_generation_server.py --load checkpoints/gpt --port 5000
    torchrun --nproc_per_node 2 tools/run_text_generation_server.py --load ckpt_tp2 \\
        --tensor-model-parallel-size 2 --port 5000
    curl -X PUT http://127.0.0.1:5000/api -H 'Content-Type: application/json' \\
        -d '{"prompts": ["The history of"], "tokens_to_generate": 32, "top_k": 1}'

Request and response format: megatron/text_generation/server.py. Global rank 0 listens on --host:--port
(--port 0 picks a free port) and prints `serving on http://HOST:PORT/api` once ready; the other ranks
generate with it. Model and tokenizer settings come from the checkpoint (tools/generate.py explains the
override flags). Stop with Ctrl-C. A user error (no checkpoint, wrong TP size, port in use) prints one
line and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.checkpointing import CheckpointError  # noqa: E402
from megatron.text_generation import add_inference_args, inference_args, load_model_for_inference  # noqa: E402
from megatron.text_generation.server import (  # noqa: E402
    GenerationEngine,
    TextGenerationServer,
    stop_workers,
    worker_loop,
)
from megatron.tokenizer import TokenizerConfigError  # noqa: E402


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add_inference_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 for every interface).")
    g.add_argument("--port", type=int, default=5000, help="Port to listen on (0: any free port).")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    return args


def _fail(message: str) -> NoReturn:
    """Exit with status 1; only global rank 0 prints the message."""
    if int(os.environ.get("RANK", "0")) == 0:
        raise SystemExit(f"error: {message}")
    raise SystemExit(1)


def main(argv: Optional[list[str]] = None) -> None:
    cli = get_args(argv)
    try:
        args = inference_args(cli)
        model, tokenizer, parallel = load_model_for_inference(args)
    except (CheckpointError, TokenizerConfigError) as e:
        _fail(str(e))
    engine = GenerationEngine(model, tokenizer, parallel, max_sequence_length=args.max_position_embeddings)
    if not parallel.is_first_rank:
        worker_loop(engine)
        return
    try:
        server = TextGenerationServer(engine, cli.host, cli.port)
    except OSError as e:
        stop_workers()  # the other ranks are already waiting in worker_loop
        _fail(f"cannot listen on {cli.host}:{cli.port}: {e}")
    host, port = server.address
    print(f"serving on http://{host}:{port}/api", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)


if __name__ == "__main__":
    main()
