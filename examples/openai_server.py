"""A tiny OpenAI-compatible chat server, standard library only: a stand-in for `vllm serve`.

    python3 openai_server.py --port 8000 [--loading-s 2]

GET /health answers 503 while the "model" loads (--loading-s seconds, as vLLM does while
it loads weights), then 200. GET /v1/models lists one model. POST /v1/chat/completions
answers with a reply that depends only on the conversation: the same prompt always gets
the same words.
"""

import argparse
import hashlib
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "tiny-chat"
WORDS = [
    *("the", "gpu", "hums", "along", "while", "tensors", "flow", "through", "layers"),
    *("of", "weights", "and", "every", "batch", "returns", "a", "little", "wiser"),
    *("than", "before", "so", "the", "loss", "falls", "and", "the", "model", "learns"),
]


def reply_to(messages):
    """Eight words chosen by a hash of the conversation: deterministic, prompt-dependent."""
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
    return " ".join(WORDS[b % len(WORDS)] for b in digest[:8])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients expect
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms wait between
    ready_at = 0.0

    def do_GET(self):
        if self.path == "/health":
            if time.monotonic() < self.ready_at:
                self.answer(503, {"status": "loading"})
            else:
                self.answer(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self.answer(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self.answer(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            self.answer(404, {"error": {"message": f"no route {self.path}"}})
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        messages = body["messages"]
        content = reply_to(messages)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        self.answer(
            200,
            {
                "id": "chatcmpl-" + hashlib.sha256(content.encode()).hexdigest()[:12],
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", MODEL),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": 8,
                    "total_tokens": prompt_tokens + 8,
                },
            },
        )

    def answer(self, status, data):
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loading-s", type=float, default=0.0)
    args = parser.parse_args()
    Handler.ready_at = time.monotonic() + args.loading_s
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"serving {MODEL} on port {args.port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
