"""tools/generate.py, tools/run_text_generation_server.py and tools/text_generation_cli.py end to end, on a
tiny GPT trained for a few iterations on WikiText-2 with a byte-level BPE trained on the same text."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import pretrain_gpt
from megatron.text_generation import GREEDY, generate, inference_args, load_model_for_inference
from megatron.text_generation.server import (
    GenerationEngine,
    RequestError,
    TextGenerationServer,
    parse_request,
)
from tests.distributed_utils import run_distributed
from tests.shared_data import wikitext_gpt_dataset
from tools import generate as generate_tool
from tools import text_generation_cli

ROOT = Path(__file__).resolve().parents[1]
MAX_POSITIONS = 64
PROMPT = "The history of the"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    """A trained tokenizer and a TP=1 checkpoint of a 2-layer GPT, plus the same checkpoint resharded to TP=2."""
    from tools.checkpoint import reshard

    tmp = tmp_path_factory.mktemp("generation")
    prefix, tok = wikitext_gpt_dataset(tmp, num_docs=10, vocab_size=500)
    ckpt = tmp / "ckpt"
    pretrain_gpt.main(
        [*f"--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length {MAX_POSITIONS} "
         f"--max-position-embeddings {MAX_POSITIONS} --micro-batch-size 4 --lr 5e-3 --train-iters 60 "
         "--log-interval 100 --eval-interval 1000 --eval-iters 0 --seed 7 --split 100,0,0".split(),
         "--data-path", prefix, "--data-cache-path", str(tmp / "cache"),
         "--save", str(ckpt), "--save-interval", "60", *tok]
    )  # fmt: skip
    reshard.main(
        ["--load", str(ckpt), "--save", str(tmp / "ckpt_tp2"), "--target-tensor-model-parallel-size", "2"]
    )
    return {"dir": str(ckpt), "tp2": str(tmp / "ckpt_tp2"), "tmp": tmp}


def _run_tool(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


# --- tools/generate.py ----------------------------------------------------------------------------------


def test_generate_tool_prints_the_greedy_continuation(checkpoint, capsys):
    texts = generate_tool.main(
        ["--load", checkpoint["dir"], "--prompt", PROMPT, "--max-new-tokens", "12", "--greedy"]
    )
    printed = capsys.readouterr().out
    assert printed == texts[0] + "\n" and texts[0]
    # the same continuation as generate() on the loaded model
    args = inference_args(generate_tool.get_args(["--load", checkpoint["dir"], "--prompt", PROMPT]))
    model, tokenizer, parallel = load_model_for_inference(args)
    out = generate(model, [tokenizer.tokenize(PROMPT)], 12, parallel, GREEDY, vocab_size=tokenizer.vocab_size)
    generated = [t for t in out.generated()[0] if t != tokenizer.eod]
    assert texts[0] == tokenizer.detokenize(generated)


def test_generate_tool_sampling_is_seeded_and_batches_prompts(checkpoint):
    base = ["--load", checkpoint["dir"], "--prompt", PROMPT, "--prompt", "In 1990 ,", "--max-new-tokens", "16",
            "--temperature", "1.5", "--top-p", "0.95"]  # fmt: skip
    first = generate_tool.main([*base, "--seed", "1"])
    assert len(first) == 2
    assert generate_tool.main([*base, "--seed", "1"]) == first
    assert generate_tool.main([*base, "--seed", "2"]) != first
    with_prompt = generate_tool.main([*base, "--seed", "1", "--print-prompt"])
    assert with_prompt == [PROMPT + first[0], "In 1990 ," + first[1]]


def test_generate_script_runs_and_reports_bad_inputs(checkpoint, tmp_path):
    ok = _run_tool(
        "generate.py", "--load", checkpoint["dir"], "--prompt", PROMPT, "--max-new-tokens", "8", "--greedy"
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() and "loading checkpoint" in ok.stderr  # logs on stderr, text on stdout

    long_prompt = " ".join(["history"] * 40)
    cases = [
        (
            ["--load", checkpoint["dir"], "--prompt", long_prompt, "--max-new-tokens", "30"],
            "max_position_embeddings",
        ),
        (["--load", str(tmp_path / "missing"), "--prompt", PROMPT], "no checkpoint in"),
        (
            ["--load", checkpoint["dir"], "--prompt", PROMPT, "--tensor-model-parallel-size", "2"],
            "tensor-model-parallel",
        ),
        (
            ["--load", checkpoint["dir"], "--prompt", PROMPT, "--vocab-file", str(tmp_path / "v.json")],
            "--vocab-file",
        ),
    ]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "latest_checkpointed_iteration.txt").write_text("5")
    cases.append((["--load", str(tmp_path / "broken"), "--prompt", PROMPT], "does not exist"))
    for argv, message in cases:
        result = _run_tool("generate.py", *argv)
        assert result.returncode == 1, (argv, result.stderr)
        assert "error:" in result.stderr and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    usage = _run_tool(
        "generate.py", "--load", checkpoint["dir"], "--prompt", PROMPT, "--top-k", "3", "--top-p", "0.5"
    )
    assert usage.returncode == 2 and "cannot be combined" in usage.stderr


def _generate_tool_on_rank(rank: int, world_size: int, load: str) -> list[str]:
    argv = ["--load", load, "--tensor-model-parallel-size", "2", "--prompt", PROMPT, "--prompt", "In 1990",
            "--max-new-tokens", "12", "--top-k", "4", "--seed", "3"]  # fmt: skip
    return generate_tool.main(argv)


def test_generate_tool_tensor_parallel_equals_single_process(checkpoint):
    reference = generate_tool.main(
        ["--load", checkpoint["dir"], "--prompt", PROMPT, "--prompt", "In 1990", "--max-new-tokens", "12",
         "--top-k", "4", "--seed", "3"]
    )  # fmt: skip
    for texts in run_distributed(_generate_tool_on_rank, 2, args=(checkpoint["tp2"],)):
        assert texts == reference


# --- the server -----------------------------------------------------------------------------------------


def _put(url: str, payload, raw: bytes = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(
        url, data=data, method="PUT", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(checkpoint):
    """The server of the checkpoint's model, in this process, on a free port."""
    args = inference_args(generate_tool.get_args(["--load", checkpoint["dir"], "--prompt", "x"]))
    model, tokenizer, parallel = load_model_for_inference(args)
    engine = GenerationEngine(model, tokenizer, parallel, max_sequence_length=args.max_position_embeddings)
    http = TextGenerationServer(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    host, port = http.address
    yield {"url": f"http://{host}:{port}/api", "address": f"{host}:{port}", "tokenizer": tokenizer}
    http.shutdown()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_server_generates_megatron_responses(server):
    status, reply = _put(
        server["url"],
        {"prompts": [PROMPT, "In 1990"], "tokens_to_generate": 10, "top_k": 1, "logprobs": True},
    )
    assert status == 200, reply
    assert set(reply) == {"text", "segments", "logprobs"}
    for prompt, text, segments, logprobs in zip(
        [PROMPT, "In 1990"], reply["text"], reply["segments"], reply["logprobs"]
    ):
        assert text.startswith(prompt) and len(text) > len(prompt)
        assert "".join(segments) == text
        assert len(logprobs) == len(segments) - 1 and all(lp <= 0.0 for lp in logprobs)
    again = _put(server["url"], {"prompts": [PROMPT, "In 1990"], "tokens_to_generate": 10, "top_k": 1})[1]
    assert again["text"] == reply["text"] and again["logprobs"] is None  # greedy is deterministic

    seeded = {"prompts": [PROMPT], "tokens_to_generate": 12, "temperature": 1.5, "random_seed": 5}
    assert _put(server["url"], seeded)[1]["text"] == _put(server["url"], seeded)[1]["text"]
    scored = _put(server["url"], {"prompts": [PROMPT], "tokens_to_generate": 0, "logprobs": True})[1]
    assert (
        scored["text"] == [PROMPT]
        and len(scored["logprobs"][0]) == len(server["tokenizer"].tokenize(PROMPT)) - 1
    )
    with_bos = _put(server["url"], {"prompts": [""], "tokens_to_generate": 3, "add_BOS": True, "top_k": 1})
    assert with_bos[0] == 200 and with_bos[1]["text"][0].startswith("<|endoftext|>")


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"tokens_to_generate": 4}, "prompts argument required"),
        ({"prompts": "x"}, "prompts is not a list of strings"),
        ({"prompts": []}, "prompts is empty"),
        ({"prompts": ["x"] * 129}, "Maximum number of prompts is 128"),
        ({"prompts": ["x"], "tokens_to_generate": -1}, "tokens_to_generate"),
        ({"prompts": ["x"], "tokens_to_generate": 0}, "logprobs should be True"),
        ({"prompts": ["x"], "temperature": 0}, "temperature"),
        ({"prompts": ["x"], "top_k": 1001}, "top_k"),
        ({"prompts": ["x"], "top_p": 1.5}, "top_p"),
        ({"prompts": ["x"], "top_k": 5, "top_p": 0.5}, "cannot set both"),
        ({"prompts": [""]}, "Empty prompts require add_BOS"),
        ({"prompts": ["x"], "random_seed": -3}, "random_seed"),
        ({"prompts": ["x"], "logprobs": "yes"}, "logprobs must be a boolean"),
        ({"prompts": ["x"], "beam_width": 2}, "not supported"),
        ({"prompts": ["x " * 40], "tokens_to_generate": 40}, "max_position_embeddings"),
    ],
)
def test_server_rejects_bad_requests_with_400(server, payload, message):
    status, reply = _put(server["url"], payload)
    assert status == 400 and message in reply["message"], reply


def test_server_rejects_malformed_json_and_unknown_paths(server):
    assert _put(server["url"], None, raw=b"{not json")[0] == 400
    status, reply = _put(server["url"].replace("/api", "/other"), {"prompts": ["x"]})
    assert status == 404 and "/api" in reply["message"]


def test_parse_request_defaults_follow_megatron():
    request = parse_request({"prompts": ["a"]})
    assert request.tokens_to_generate == 64 and not request.logprobs and request.random_seed is None
    assert (request.sampling.temperature, request.sampling.top_k, request.sampling.top_p) == (1.0, 0, 0.0)
    assert parse_request({"prompts": ["a"], "top_k": 1}).sampling.greedy
    with pytest.raises(RequestError):
        parse_request({"prompts": ["a"], "tokens_to_generate": True})  # a bool is not an integer here


def test_cli_asks_for_prompt_and_tokens_and_prints_the_text(server, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPT}\n5\nanother\nmany\n"))
    text_generation_cli.main([server["address"]])
    out = capsys.readouterr().out
    assert "Enter prompt: " in out and "Enter number of tokens to generate: " in out
    response = out.split("Megatron Response: \n")[1].splitlines()[0]
    assert response.startswith(PROMPT) and len(response) > len(PROMPT)
    assert "not an integer: 'many'" in out
    assert (
        text_generation_cli.api_url("http://h:1/") == "http://h:1/api" == text_generation_cli.api_url("h:1")
    )


def _serve_on_rank(rank: int, world_size: int, load: str) -> dict:
    """Rank 0 serves (a client thread sends requests, then shuts the server down); rank 1 follows."""
    import time

    from megatron.text_generation import server as server_module

    server_module.IDLE_BROADCAST_SECONDS = 0.05  # exercise the keep-alive messages
    argv = ["--load", load, "--tensor-model-parallel-size", "2", "--prompt", "x"]
    args = inference_args(generate_tool.get_args(argv))
    model, tokenizer, parallel = load_model_for_inference(args)
    engine = GenerationEngine(model, tokenizer, parallel, max_sequence_length=args.max_position_embeddings)
    if rank != 0:
        server_module.worker_loop(engine)
        return {}
    http = TextGenerationServer(engine, "127.0.0.1", 0)
    url = "http://{}:{}/api".format(*http.address)
    results = {}

    def client() -> None:
        try:
            time.sleep(0.3)
            results["greedy"] = _put(
                url, {"prompts": [PROMPT, "In 1990"], "tokens_to_generate": 8, "top_k": 1}
            )
            results["too_long"] = _put(url, {"prompts": ["x " * 40], "tokens_to_generate": 40})
            time.sleep(0.2)
            results["seeded"] = _put(url, {"prompts": [PROMPT], "tokens_to_generate": 8, "random_seed": 4})
        finally:
            http.shutdown()

    thread = threading.Thread(target=client)
    thread.start()
    http.serve_forever()
    thread.join()
    return results


def test_server_under_tensor_parallelism_equals_single_process(checkpoint, server):
    results = run_distributed(_serve_on_rank, 2, args=(checkpoint["tp2"],))[0]
    assert results["greedy"] == _put(
        server["url"], {"prompts": [PROMPT, "In 1990"], "tokens_to_generate": 8, "top_k": 1}
    )
    assert results["seeded"] == _put(
        server["url"], {"prompts": [PROMPT], "tokens_to_generate": 8, "random_seed": 4}
    )
    assert results["too_long"][0] == 400


def test_server_script_serves_until_terminated(checkpoint):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "run_text_generation_server.py"), "--load", checkpoint["dir"], "--port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://"), line
        url = line.split()[-1]
        status, reply = _put(url, {"prompts": [PROMPT], "tokens_to_generate": 4, "no_log": True})
        assert status == 200 and reply["text"][0].startswith(PROMPT)
        assert _put(url, {"prompts": [PROMPT], "top_p": 2.0})[0] == 400
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    missing = _run_tool("run_text_generation_server.py", "--load", str(checkpoint["tmp"] / "nothing"))
    assert (
        missing.returncode == 1 and "no checkpoint in" in missing.stderr and "Traceback" not in missing.stderr
    )


def test_loaded_model_is_in_eval_mode_with_full_logits(checkpoint):
    args = inference_args(generate_tool.get_args(["--load", checkpoint["dir"], "--prompt", "x"]))
    model, tokenizer, _ = load_model_for_inference(args)
    assert not model.training and not model.parallel_output
    assert args.hidden_dropout == 0.0 and args.max_position_embeddings == MAX_POSITIONS
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]]), torch.arange(3).unsqueeze(0))
    assert logits.shape == (1, 3, args.padded_vocab_size) and args.padded_vocab_size >= tokenizer.vocab_size
