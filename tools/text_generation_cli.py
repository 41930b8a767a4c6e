"""Interactive client of the text generation server (Megatron-LM's tools/text_generation_cli.py).

    python tools/text_generation_cli.py localhost:5000

Asks for a prompt and the number of tokens to generate, sends them to `http://URL/api` (PUT, JSON) and
prints the text the server returns (prompt + generation), until end of input (Ctrl-D). URL may also be
given with its scheme (http://host:port) or with the /api path. An error reply prints its status and
message and the loop goes on.
"""

from __future__ import annotations

import ast
import json
import sys
import urllib.error
import urllib.request
from typing import Optional


def api_url(url: str) -> str:
    """`host:port` -> `http://host:port/api` (a scheme or an /api path already given is kept)."""
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    return url if url.endswith("/api") else url + "/api"


def put_request(url: str, payload: dict, timeout: float = 600.0) -> tuple[int, dict]:
    """PUT `payload` as JSON to `url`; return (HTTP status, decoded JSON reply)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode("utf-8"),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"message": body.decode("utf-8", errors="replace")}


def _read_tokens_to_generate() -> Optional[int]:
    text = input("Enter number of tokens to generate: ")
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, int) or isinstance(value, bool):
        print(f"not an integer: {text!r}")
        return None
    return value


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python tools/text_generation_cli.py HOST:PORT")
    url = api_url(argv[0])
    while True:
        try:
            prompt = input("Enter prompt: ")
            tokens_to_generate = _read_tokens_to_generate()
        except EOFError:
            print()
            return
        if tokens_to_generate is None:
            continue
        try:
            status, reply = put_request(url, {"prompts": [prompt], "tokens_to_generate": tokens_to_generate})
        except (urllib.error.URLError, OSError) as e:
            raise SystemExit(f"error: cannot reach {url}: {getattr(e, 'reason', e)}") from None
        if status != 200:
            print(f"Error {status}: {reply.get('message')}")
        else:
            print("Megatron Response: ")
            print(reply["text"][0])


if __name__ == "__main__":
    main()
