"""A stand-in for one SGLang HTTP server, for the protocol tests of the main environment (which
has no SGLang; the real SGLang 0.5.23 runs in tests/sglang_cpu/ in its own environment) and for
what the real one cannot be made to do on purpose: SGLang 0.5.20's protocol (no update session:
``sessions=False`` answers 404 to ``/begin_weight_update`` / ``/end_weight_update`` and takes
updates without one), a worker that refuses an update before receiving (``refuse_updates``).

A real ``http.server`` on a free 127.0.0.1 port, in its own (spawned) process, that records
every request and answers like SGLang 0.5.23's ``http_server.py``: by default every update must
sit in a session (``/begin_weight_update`` ... ``/end_weight_update``), and an update outside one
is refused with SGLang's message before anything is received. Its weight receiving mirrors
SGLang's ``ModelRunner`` (``model_executor/model_runner_components/weight_updater.py``):
``/init_weights_update_group`` joins the trainer's group at ``rank_offset`` (TP size 1 here);
``/update_weights_from_distributed`` allocates every named tensor from ``names/dtypes/shapes``
and receives a broadcast from rank 0: one flat buffer of all of them with
``load_format="flattened_bucket"``, else one broadcast per tensor in order. ``GET /_state``
(not an SGLang endpoint) returns what was recorded and received. Generation is a
deterministic function of the prompt and the request's ``sampling_seed``.

Use :func:`running_server` (a context manager that stops the process by its handle) and
:func:`reset_server` between tests that share one.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

VOCAB = 97


def _fake_generation(prompt, sampling):
    """Tokens and log-probs the fake 'model' produces: a function of prompt and seed."""
    if sampling.get("max_new_tokens", 128) == 0:
        triples = [[None, prompt[0], None]] + [[-((t % 7) + 1) / 10, t, None] for t in prompt[1:]]
        return {"output_ids": [], "meta_info": {"finish_reason": {"type": "length", "length": 0},
                                                  "output_token_logprobs": [], "input_token_logprobs": triples}}
    seed = sampling.get("sampling_seed", 0)
    tokens = [(sum(prompt) + seed + k) % VOCAB for k in range(sampling["max_new_tokens"])]
    triples = [[-(t + 1) / 100, t, None] for t in tokens]
    return {"output_ids": tokens, "meta_info": {"finish_reason": {"type": "length", "length": len(tokens)},
                                                "output_token_logprobs": triples}}


class _State:
    def __init__(self, config):
        self.groups = {}
        self.lock = threading.Lock()
        self.reset(config)

    def reset(self, config):
        self.config = config
        self.requests = []
        self.received = {}
        self.flush_busy = int(config.get("flush_busy", 0))
        self.session_open = False
        self.released = False

    def session(self, path):
        """0.5.23's ``SchedulerWeightUpdaterManager.begin_weight_update`` / ``end_weight_update``."""
        if not self.config.get("sessions", True):
            return 404, {"detail": "Not Found"}
        if path == "/begin_weight_update":
            if self.session_open:
                return 400, {"success": False, "message": "a weight-update session is already open; "
                                                          "call end_weight_update() first"}
            self.session_open = True
        else:
            if not self.session_open:
                return 400, {"success": False, "message": "no weight-update session is open; "
                                                          "call begin_weight_update() first"}
            self.session_open = False
        return 200, {"success": True, "message": "Success"}

    def receive(self, body):
        if self.config.get("refuse_updates"):  # answers at once: joins no broadcast
            return 400, {"success": False, "message": self.config["refuse_updates"]}
        if self.config.get("sessions", True) and not self.session_open:
            return 400, {"success": False, "message": "update_weights_from_distributed must run between "
                                                      "begin_weight_update() and end_weight_update()"}
        group = self.groups[body["group_name"]]
        tensors = [torch.empty(shape, dtype=getattr(torch, dtype))
                   for dtype, shape in zip(body["dtypes"], body["shapes"])]
        if body.get("load_format") == "flattened_bucket":
            flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype)
            torch.distributed.broadcast(flat, src=0, group=group)
            offset = 0
            for tensor in tensors:
                tensor.copy_(flat[offset:offset + tensor.numel()].view(tensor.shape))
                offset += tensor.numel()
        else:
            handles = [torch.distributed.broadcast(t, src=0, group=group, async_op=True) for t in tensors]
            for handle in handles:
                handle.wait()
        rejected = [n for n in body["names"] if n in self.config.get("reject_names", ())]
        for name, tensor in zip(body["names"], tensors):
            self.received[name] = {"dtype": str(tensor.dtype), "shape": list(tensor.shape),
                                   "values": tensor.float().flatten().tolist()}
        if rejected:
            return 400, {"success": False, "message": f"unknown parameter {rejected[0]}"}
        return 200, {"success": True, "message": "Succeeded to update parameter online."}


def _answer(state, method, path, body):
    if path in ("/server_info", "/get_server_info"):
        return 200, {"tp_size": 1, "dp_size": 1, "pp_size": 1,
                     "enable_memory_saver": state.config.get("memory_saver", True)}
    if path in ("/begin_weight_update", "/end_weight_update"):
        return state.session(path)
    if path == "/workers":
        return 200, {"workers": [{"url": u} for u in state.config.get("workers", [])], "total": 1}
    if path == "/generate":
        sampling = body["sampling_params"]
        if isinstance(sampling, dict):
            sampling = [sampling] * len(body["input_ids"])
        return 200, [_fake_generation(p, s) for p, s in zip(body["input_ids"], sampling)]
    if path == "/init_weights_update_group":
        from megacredit.rollout.weight_group import join_weight_update_group

        state.groups[body["group_name"]] = join_weight_update_group(
            body["master_address"], body["master_port"], body["world_size"], body["rank_offset"],
            body["group_name"], body["backend"])
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}
    if path == "/update_weights_from_distributed":
        return state.receive(body)
    if path == "/destroy_weights_update_group":
        torch.distributed.destroy_process_group(state.groups.pop(body["group_name"]))
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}
    if path == "/flush_cache":
        if state.flush_busy > 0:
            state.flush_busy -= 1
            return 400, "Cache not flushed: there are running or waiting requests."
        return 200, "Cache flushed."
    if path in ("/pause_generation", "/continue_generation"):
        return 200, {"message": "ok", "status": "ok"}
    if path == "/release_memory_occupation":
        state.released = True
        return 200, None
    if path == "/resume_memory_occupation":  # 0.5.23: offload_tags.remove(tag) raises, the scheduler dies
        if not state.released:
            return 500, "KeyError: 'weights' (resume_memory_occupation without a release)"
        state.released = False
        return 200, None
    return 404, {"error": f"no route {method} {path}"}


def _handler_class(state):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            if self.path == "/_state":
                status, answer = 200, {"requests": state.requests, "received": state.received}
            elif self.path == "/_reset":  # forget what was recorded, take a new config
                state.reset(body or {})
                status, answer = 200, None
            elif self.path in ("/health", "/ping"):  # health checks (not recorded: the pool asks at every update)
                status, answer = 200, None
            else:
                with state.lock:
                    state.requests.append([method, self.path, body])
                status, answer = _answer(state, method, self.path, body)
            data = b"" if answer is None else json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - http.server's naming
            self._serve("GET")

        def do_POST(self):  # noqa: N802
            self._serve("POST")

        def log_message(self, *args):  # quiet
            pass

    return Handler


def serve(config, port_queue) -> None:
    """Process entry point: serve until terminated."""
    torch.set_num_threads(1)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(_State(config)))
    port_queue.put(server.server_address[1])
    server.serve_forever()


@contextlib.contextmanager
def running_server(**config):
    """Start a fake SGLang server process; yields its URL; always stops it (by its handle)."""
    context = multiprocessing.get_context("spawn")
    port_queue = context.Queue()
    process = context.Process(target=serve, args=(config, port_queue), daemon=True)
    process.start()
    try:
        port = port_queue.get(timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join(timeout=10)


def reset_server(url: str, **config) -> str:
    """Forget the recorded requests and received tensors; apply ``config``; returns ``url``."""
    from megacredit.rollout.http_json import JSONClient

    JSONClient(30).post(url, "/_reset", config)
    return url


def server_state(url: str) -> dict:
    """What the fake server recorded (requests in arrival order) and received (tensors)."""
    from megacredit.rollout.http_json import JSONClient

    return JSONClient(30).get(url, "/_state")
