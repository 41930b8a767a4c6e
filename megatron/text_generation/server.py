"""Megatron-LM's text generation REST API on the standard library's HTTP server.

    PUT /api   {"prompts": ["..."], "tokens_to_generate": 64, "temperature": 1.0, "top_k": 0, "top_p": 0.0,
                "logprobs": false, "add_BOS": false, "random_seed": 1234, "no_log": false}
      200      {"text": [prompt + generation, ...], "segments": [[token text, ...], ...],
                "logprobs": [[log p(token t+1 | ..t), ...], ...] or null}
      400      {"message": "what is wrong with the request"}

Field rules are Megatron-LM's (`parse_request`): 1 to 128 prompts, tokens_to_generate >= 0 (default 64;
0 only scores the prompts and needs logprobs), 0 < temperature <= 100, 0 <= top_k <= 1000 (1 = greedy),
0 <= top_p <= 1, not top_k > 0 together with top_p > 0, random_seed >= 0, empty prompts only with
add_BOS. Megatron-LM's beam search and stop-on-newline options are refused with a 400.

Processes: global rank 0 serves HTTP. Its handler threads validate a request, queue it and wait; rank 0's
main thread takes requests one at a time, broadcasts each to every rank (torch.distributed
broadcast_object_list), and all ranks generate together (`GenerationEngine.run`, collective over the TP
group) while the other ranks loop in `worker_loop`. When idle, rank 0 broadcasts a keep-alive message
every `IDLE_BROADCAST_SECONDS`, so the waiting ranks never reach the process group's timeout; on
shutdown it broadcasts a stop message.
"""

from __future__ import annotations

import json
import queue
import threading
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Union

import torch.distributed as dist
from torch import nn

from megatron.parallel.state import ParallelState
from megatron.text_generation.api import GenerationResponse, generate_and_post_process, tokenize_prompts
from megatron.text_generation.generation import GenerationError, check_request
from megatron.text_generation.sampling import SamplingParams
from megatron.tokenizer import AbstractTokenizer

API_PATH = "/api"
MAX_PROMPTS = 128
DEFAULT_TOKENS_TO_GENERATE = 64
IDLE_BROADCAST_SECONDS = 30.0
STOP = "stop"  # rank 0 -> other ranks: leave worker_loop
IDLE = "idle"  # rank 0 -> other ranks: keep-alive, nothing to do
UNSUPPORTED_FIELDS = {
    "max_len": "max_len is no longer used; replace it with tokens_to_generate",
    "sentences": "sentences is no longer used; replace it with prompts",
    "beam_width": "beam search (beam_width) is not supported by this server",
    "top_p_decay": "top_p_decay is not supported by this server",
    "top_p_bound": "top_p_bound is not supported by this server",
    "stop_on_eol": "stop_on_eol is not supported by this server",
    "stop_on_double_eol": "stop_on_double_eol is not supported by this server",
    "prevent_newline_after_colon": "prevent_newline_after_colon is not supported by this server",
}


class RequestError(ValueError):
    """A malformed request; its message is returned with status 400."""


@dataclass(frozen=True)
class GenerateRequest:
    """A validated PUT /api body."""

    prompts: list[str]
    tokens_to_generate: int = DEFAULT_TOKENS_TO_GENERATE
    logprobs: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    add_bos: bool = False
    random_seed: Optional[int] = None
    no_log: bool = False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bool_field(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean value")
    return value


def parse_request(body: Any) -> GenerateRequest:
    """Validate a decoded JSON body with Megatron-LM's rules (module docstring); RequestError if invalid."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name, message in UNSUPPORTED_FIELDS.items():
        if name in body:
            raise RequestError(message)
    if "prompts" not in body:
        raise RequestError("prompts argument required")
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts is not a list of strings")
    if not prompts:
        raise RequestError("prompts is empty")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"Maximum number of prompts is {MAX_PROMPTS}")

    tokens_to_generate = body.get("tokens_to_generate", DEFAULT_TOKENS_TO_GENERATE)
    if not _is_int(tokens_to_generate) or tokens_to_generate < 0:
        raise RequestError("tokens_to_generate must be an integer greater than or equal to 0")
    logprobs = _bool_field(body, "logprobs")
    if tokens_to_generate == 0 and not logprobs:
        raise RequestError("tokens_to_generate=0 implies logprobs should be True")

    temperature = body.get("temperature", 1.0)
    if not _is_number(temperature) or not 0.0 < temperature <= 100.0:
        raise RequestError("temperature must be a positive number less than or equal to 100.0")
    top_k = body.get("top_k", 0)
    if not _is_int(top_k) or not 0 <= top_k <= 1000:
        raise RequestError(
            "top_k must be an integer equal to or greater than 0 and less than or equal to 1000"
        )
    top_p = body.get("top_p", 0.0)
    if not _is_number(top_p) or not 0.0 <= top_p <= 1.0:
        raise RequestError("top_p must be a number between 0 and 1.0")
    if top_p > 0.0 and top_k > 0:
        raise RequestError("cannot set both top-k and top-p samplings.")

    add_bos = _bool_field(body, "add_BOS")
    if any(len(prompt) == 0 for prompt in prompts) and not add_bos:
        raise RequestError("Empty prompts require add_BOS=true")
    random_seed = body.get("random_seed")
    if random_seed is not None and (not _is_int(random_seed) or random_seed < 0):
        raise RequestError("random_seed must be a non-negative integer")
    return GenerateRequest(
        prompts=prompts,
        tokens_to_generate=tokens_to_generate,
        logprobs=logprobs,
        sampling=SamplingParams(temperature=float(temperature), top_k=top_k, top_p=float(top_p)),
        add_bos=add_bos,
        random_seed=random_seed,
        no_log=_bool_field(body, "no_log"),
    )


class GenerationEngine:
    """The model, its tokenizer and parallel state: checks and runs requests."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: AbstractTokenizer,
        parallel: ParallelState,
        max_sequence_length: Optional[int],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.parallel = parallel
        self.max_sequence_length = max_sequence_length

    def check(self, request: GenerateRequest) -> None:
        """Raise GenerationError when the model cannot serve `request` (no communication)."""
        prompts_tokens = tokenize_prompts(self.tokenizer, request.prompts, request.add_bos)
        check_request(
            prompts_tokens,
            request.tokens_to_generate,
            self.max_sequence_length,
            self.tokenizer.vocab_size,
            request.sampling,
        )

    def run(self, request: GenerateRequest) -> GenerationResponse:
        """Generate for `request`; collective: every rank of the TP group runs the same request."""
        return generate_and_post_process(
            self.model,
            self.tokenizer,
            self.parallel,
            request.prompts,
            request.tokens_to_generate,
            request.sampling,
            seed=request.random_seed,
            add_bos=request.add_bos,
            return_log_probs=request.logprobs,
            max_sequence_length=self.max_sequence_length,
        )


def _broadcast_message(message: Union[GenerateRequest, str, None]) -> Union[GenerateRequest, str]:
    """Rank 0's `message`, on every rank (the identity in a single process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def stop_workers() -> None:
    """Rank 0: make the other ranks leave worker_loop."""
    _broadcast_message(STOP)


def worker_loop(engine: GenerationEngine) -> None:
    """Ranks other than 0: run every request rank 0 broadcasts, until it broadcasts STOP."""
    while True:
        message = _broadcast_message(None)
        if message == STOP:
            return
        if message == IDLE:
            continue
        try:
            engine.run(message)
        except GenerationError:
            pass  # rank 0 meets the same error and reports it to the client


@dataclass
class _Job:
    """A request waiting for rank 0's main thread, and its outcome."""

    request: GenerateRequest
    finished: threading.Event = field(default_factory=threading.Event)
    response: Optional[GenerationResponse] = None
    error: Optional[tuple[int, str]] = None  # (HTTP status, message)


class TextGenerationServer:
    """Rank 0's HTTP front end (module docstring). `serve_forever()` runs the requests on the calling
    thread until `shutdown()`; the HTTP server itself runs on a background thread."""

    def __init__(self, engine: GenerationEngine, host: str = "127.0.0.1", port: int = 5000) -> None:
        self.engine = engine
        self._jobs: queue.Queue[Optional[_Job]] = queue.Queue()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the server listens on (the real port when 0 was asked for)."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def submit(self, request: GenerateRequest) -> _Job:
        """Queue `request` for the main thread; wait on the returned job's `finished` event."""
        job = _Job(request)
        self._jobs.put(job)
        return job

    def shutdown(self) -> None:
        """Make serve_forever() return (from any thread)."""
        self._jobs.put(None)

    def serve_forever(self) -> None:
        http_thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        http_thread.start()
        try:
            while True:
                try:
                    job = self._jobs.get(timeout=IDLE_BROADCAST_SECONDS)
                except queue.Empty:
                    _broadcast_message(IDLE)
                    continue
                if job is None:
                    return
                self._run(job)
        finally:
            stop_workers()
            self._httpd.shutdown()
            self._httpd.server_close()
            http_thread.join()

    def _run(self, job: _Job) -> None:
        _broadcast_message(job.request)
        try:
            job.response = self.engine.run(job.request)
        except GenerationError as e:
            job.error = (400, str(e))
        except Exception as e:  # noqa: BLE001 - reported to the client; the server keeps serving
            traceback.print_exc()
            job.error = (500, f"generation failed: {type(e).__name__}: {e}")
        finally:
            job.finished.set()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 - the name http.server dispatches to
                if self.path.rstrip("/") != API_PATH:
                    self._reply(404, {"message": f"unknown path {self.path}; use PUT {API_PATH}"})
                    return
                try:
                    length = int(self.headers.get("Content-Length", 0))
                    body = json.loads(self.rfile.read(length) or b"null")
                except (ValueError, UnicodeDecodeError):
                    self._reply(400, {"message": "the request body is not valid JSON"})
                    return
                try:
                    request = parse_request(body)
                    server.engine.check(request)
                except (RequestError, GenerationError) as e:
                    self._reply(400, {"message": str(e)})
                    return
                if not request.no_log:
                    print(f"request from {self.client_address[0]}: {json.dumps(body)}", flush=True)
                job = server.submit(request)
                job.finished.wait()
                if job.error is not None:
                    self._reply(job.error[0], {"message": job.error[1]})
                    return
                response = job.response
                self._reply(
                    200, {"text": response.text, "segments": response.segments, "logprobs": response.logprobs}
                )

            def _reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
