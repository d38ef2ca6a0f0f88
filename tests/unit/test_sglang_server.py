"""Remote SGLang engine over HTTP, against real local HTTP servers that record the requests and
receive weights over a real torch.distributed group (gloo) the way SGLang's ModelRunner does
(tests/unit/sglang_fake_server.py): megacredit's side of the protocol, exact request sequences,
SGLang 0.5.20's protocol (no update session) and workers that refuse mid-update. The real SGLang
0.5.23 runs the same engine in tests/sglang_cpu/test_sglang_server_cpu.py."""

from __future__ import annotations

import pytest
import torch

from megacredit.rollout.base import SamplingParams, WeightSyncError, manifest_of
from megacredit.rollout.http_json import EngineHTTPError, normalize_url
from megacredit.rollout.sglang_server import SGLangServerEngine
from megacredit.rollout.weight_group import free_port
from sglang_fake_server import reset_server, running_server, server_state

PROMPTS = [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14], [1, 2]]


@pytest.fixture(scope="module")
def fleet():
    """Three fake SGLang server processes shared by the module (each starts in seconds)."""
    with running_server() as one, running_server() as two, running_server() as three:
        yield one, two, three


@pytest.fixture
def servers(fleet):
    """The fleet with its recordings cleared and the default config."""
    return tuple(reset_server(url) for url in fleet)


def test_normalize_url_accepts_host_port_and_names_the_field():
    assert normalize_url("node3:30000") == "http://node3:30000"
    assert normalize_url("https://a.b:443/") == "https://a.b:443"
    with pytest.raises(ValueError, match="rollout.urls"):
        normalize_url("node3")
    with pytest.raises(ValueError, match="rollout.router_url"):
        normalize_url("ftp://x:1", "rollout.router_url")


def _tokens(outputs):
    return [(o.prompt_index, o.prompt_ids, o.token_ids, o.logprobs, o.finish_reason) for o in outputs]


def test_generation_split_over_workers_equals_one_worker(servers):
    params = SamplingParams(temperature=0.7, max_new_tokens=3, n=2, seed=11)
    one, a, b = servers
    single = SGLangServerEngine([one]).generate(PROMPTS, params)
    split = SGLangServerEngine([a, b]).generate(PROMPTS, params)
    requests_a, requests_b = server_state(a)["requests"], server_state(b)["requests"]
    assert _tokens(split) == _tokens(single)
    assert [o.prompt_index for o in split] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    (method, path, body_a), = requests_a
    assert (method, path) == ("POST", "/generate") and body_a["return_logprob"] is True
    assert body_a["input_ids"] == [p for p in PROMPTS[:3] for _ in range(2)]
    assert requests_b[0][2]["input_ids"] == [p for p in PROMPTS[3:] for _ in range(2)]
    seeds = [s["sampling_seed"] for s in body_a["sampling_params"] + requests_b[0][2]["sampling_params"]]
    assert len(set(seeds)) == len(seeds)  # every sample of every prompt has its own seed
    assert body_a["sampling_params"][0] == {"temperature": 0.7, "top_p": 1.0, "top_k": -1,
                                            "max_new_tokens": 3, "sampling_seed": 11}


def test_router_gets_the_generation_and_lists_the_workers(servers):
    worker, router, empty_router = servers
    reset_server(router, workers=[worker])
    engine = SGLangServerEngine(router_url=router)
    assert engine.workers == [worker]
    engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=2))
    engine.wake()  # the trainer's first sync wakes an engine that never slept: nothing to resume
    engine.sleep()
    engine.sleep()
    engine.wake()
    assert [r[1] for r in server_state(router)["requests"]] == ["/workers", "/generate"]
    assert [r[1] for r in server_state(worker)["requests"]] == ["/server_info", "/release_memory_occupation",
                                                                "/resume_memory_occupation"]
    reset_server(worker, memory_saver=False)  # started without --enable-memory-saver: nothing to release
    engine = SGLangServerEngine([worker])
    engine.sleep()
    engine.wake()
    assert [r[1] for r in server_state(worker)["requests"]] == ["/server_info"]
    with pytest.raises(ValueError, match="lists no workers"):
        SGLangServerEngine(router_url=empty_router)


def test_score_logprobs_drops_the_first_token(servers):
    url = servers[0]
    scores = SGLangServerEngine([url]).score_logprobs([[3, 8, 15], [4, 9]])
    (_, _, body), = server_state(url)["requests"]
    assert scores == [[-((8 % 7) + 1) / 10, -((15 % 7) + 1) / 10], [-((9 % 7) + 1) / 10]]
    assert body["logprob_start_len"] == 0 and body["sampling_params"]["max_new_tokens"] == 0
    assert body["sampling_params"]["temperature"] == 1.0


def _weights():
    generator = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(7, 4, generator=generator)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(4, 4, generator=generator)),
        ("model.norm.weight", torch.randn(4, generator=generator).to(torch.bfloat16)),
        ("lm_head.weight", torch.randn(7, 4, generator=generator)),
    ]


def _assert_received(received, pairs):
    assert set(received) == {name for name, _ in pairs}
    for name, tensor in pairs:
        got = received[name]
        assert got["dtype"] == str(tensor.dtype) and got["shape"] == list(tensor.shape), name
        assert torch.equal(torch.tensor(got["values"]), tensor.float().flatten()), name


@pytest.mark.parametrize("flatten", [True, False])
def test_distributed_update_request_sequence_and_exact_tensors(servers, flatten):
    pairs = _weights()
    buckets = [pairs[:2], pairs[2:]]  # the second bucket mixes bf16 and fp32: two requests
    a, b, _ = servers
    engine = SGLangServerEngine([a, b], flatten=flatten)
    engine.connect_weight_sync("127.0.0.1", free_port(), group_name="megacredit_pp0", backend="gloo")
    report = engine.update_weights_from_buckets(iter(buckets), manifest_of(pairs))
    engine.shutdown()
    states = [server_state(a), server_state(b)]
    assert report.num_tensors == 4
    for offset, state in enumerate(states, start=1):
        paths = [path for _, path, _ in state["requests"]]
        assert paths == ["/server_info", "/init_weights_update_group", "/pause_generation",
                         "/begin_weight_update", "/update_weights_from_distributed",
                         "/update_weights_from_distributed", "/update_weights_from_distributed",
                         "/end_weight_update", "/flush_cache", "/continue_generation",
                         "/destroy_weights_update_group"]
        init = state["requests"][1][2]
        assert (init["rank_offset"], init["world_size"], init["group_name"]) == (offset, 3, "megacredit_pp0")
        assert state["requests"][2][2] == {"mode": "abort"}
        updates = [body for _, path, body in state["requests"] if path == "/update_weights_from_distributed"]
        assert [u["names"] for u in updates] == [[n for n, _ in pairs[:2]], ["model.norm.weight"], ["lm_head.weight"]]
        assert updates[1]["dtypes"] == ["bfloat16"] and updates[0]["shapes"] == [[7, 4], [4, 4]]
        assert all(u["flush_cache"] is False for u in updates)
        assert all((u.get("load_format") == "flattened_bucket") == flatten for u in updates)
        _assert_received(state["received"], pairs)


def test_a_bad_name_is_refused_before_any_weight_moves(servers, tmp_path):
    from safetensors.torch import save_file

    pairs = _weights()
    save_file({n: t.contiguous() for n, t in pairs}, str(tmp_path / "model.safetensors"))
    bad = pairs[:3] + [("lm_head.weights", pairs[3][1])]
    url = servers[0]
    engine = SGLangServerEngine([url], model_path=tmp_path)
    engine.connect_weight_sync("127.0.0.1", free_port(), backend="gloo")
    with pytest.raises(KeyError, match="did you mean 'lm_head.weight'"):
        engine.update_weights_from_buckets([bad], manifest_of(bad))
    with pytest.raises(ValueError, match="has shape"):
        wrong = pairs[:3] + [("lm_head.weight", pairs[3][1][:-1])]
        engine.update_weights_from_buckets([wrong], manifest_of(wrong))
    engine.update_weights_from_buckets([pairs], manifest_of(pairs))  # a correct one still goes through
    engine.shutdown()
    state = server_state(url)
    # the refused updates sent nothing at all (not even a pause); the good one went through
    assert [path for _, path, _ in state["requests"]] == [
        "/server_info", "/init_weights_update_group", "/pause_generation", "/begin_weight_update",
        "/update_weights_from_distributed", "/update_weights_from_distributed", "/end_weight_update",
        "/flush_cache", "/continue_generation", "/destroy_weights_update_group"]
    updates = [body for _, path, body in state["requests"] if path == "/update_weights_from_distributed"]
    assert [u["names"] for u in updates] == [[n for n, _ in pairs if n != "model.norm.weight"],
                                              ["model.norm.weight"]]


def test_an_engine_side_failure_raises_a_sync_error_and_resumes_generation(servers):
    pairs = _weights()
    url = reset_server(servers[0], reject_names=["lm_head.weight"])
    engine = SGLangServerEngine([url])
    engine.connect_weight_sync("127.0.0.1", free_port(), backend="gloo")
    with pytest.raises(WeightSyncError, match="unknown parameter lm_head.weight"):
        engine.update_weights_from_buckets([pairs], manifest_of(pairs))
    engine.shutdown()
    paths = [path for _, path, _ in server_state(url)["requests"]]
    # the session is closed and generation continues, the group (intact: the worker received) is kept
    assert paths[-3:] == ["/end_weight_update", "/continue_generation", "/destroy_weights_update_group"]
    assert "/flush_cache" not in paths


def test_flush_cache_waits_for_busy_workers_and_load_weights_needs_a_group(servers):
    url = reset_server(servers[0], flush_busy=2)
    engine = SGLangServerEngine([url])
    engine.flush_cache(wait_seconds=30)
    assert [p for _, p, _ in server_state(url)["requests"]] == ["/flush_cache"] * 3
    with pytest.raises(RuntimeError, match="no broadcast group"):
        engine.load_weights(_weights())
    with pytest.raises(EngineHTTPError, match="HTTP 404"):
        engine.client.post(url, "/no_such_endpoint", {})


def test_the_first_update_connects_the_group_by_itself(servers):
    pairs = _weights()
    url = servers[0]
    engine = SGLangServerEngine([url], sync_backend="gloo")
    engine.update_weights_from_buckets([pairs], manifest_of(pairs))
    engine.update_weights_from_buckets([pairs], manifest_of(pairs))  # connected once, reused
    engine.shutdown()
    requests = server_state(url)["requests"]
    inits = [body for _, path, body in requests if path == "/init_weights_update_group"]
    assert len(inits) == 1 and inits[0]["master_address"] == "127.0.0.1"  # the route to 127.0.0.1
    assert inits[0]["group_name"] == "megacredit_pp0" and inits[0]["backend"] == "gloo"
    _assert_received(server_state(url)["received"], pairs)


def test_sglang_0520_servers_take_updates_without_a_session(servers):
    """SGLang 0.5.20 has no /begin_weight_update (404): the update goes through without one."""
    pairs = _weights()
    url = reset_server(servers[0], sessions=False)
    engine = SGLangServerEngine([url], sync_backend="gloo")
    engine.update_weights_from_buckets([pairs], manifest_of(pairs))
    engine.shutdown()
    paths = [path for _, path, _ in server_state(url)["requests"]]
    assert paths[2:] == ["/pause_generation", "/begin_weight_update", "/update_weights_from_distributed",
                         "/update_weights_from_distributed", "/flush_cache", "/continue_generation",
                         "/destroy_weights_update_group"]
    _assert_received(server_state(url)["received"], pairs)


def test_a_refused_session_raises_before_anything_moves(servers):
    pairs = _weights()
    url = servers[0]
    engine = SGLangServerEngine([url], sync_backend="gloo")
    engine.client.post(url, "/begin_weight_update", {})  # someone else holds the session
    with pytest.raises(WeightSyncError, match="session is already open.*keeps its previous weights"):
        engine.update_weights_from_buckets([pairs], manifest_of(pairs))
    engine.shutdown()
    paths = [path for _, path, _ in server_state(url)["requests"]]
    assert "/update_weights_from_distributed" not in paths and paths[-2:] == [
        "/continue_generation", "/destroy_weights_update_group"]


def test_a_worker_refusing_before_receiving_does_not_block_the_broadcast(servers):
    """Worker b refuses at once (joins no broadcast): the update fails within seconds, not at
    the group's 10-minute timeout; worker a, left waiting in its receive, is not this rank's
    problem; the next update connects a new group."""
    import time

    pairs = _weights()
    a, b, _ = servers
    reset_server(b, refuse_updates="Failed to receive weights: Group megacredit_pp0 not in []")
    engine = SGLangServerEngine([b], sync_backend="gloo", update_timeout=60)
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="Group megacredit_pp0 not in"):
        engine.update_weights_from_buckets([pairs], manifest_of(pairs))
    assert time.monotonic() - start < 30
    assert engine._group is None  # abandoned: its send may still be pending
    reset_server(b)
    engine.update_weights_from_buckets([pairs], manifest_of(pairs))  # a fresh group
    inits = [body for _, path, body in server_state(b)["requests"] if path == "/init_weights_update_group"]
    assert [i["group_name"] for i in inits] == ["megacredit_pp0_1"]
    _assert_received(server_state(b)["received"], pairs)
    engine.shutdown()


def test_a_silent_worker_is_bounded_by_the_update_timeout(servers):
    """A worker that never answers the group's rendezvous: connect gives up after update_timeout."""
    engine = SGLangServerEngine([servers[0]], sync_backend="gloo", update_timeout=3)
    engine.tp_sizes = lambda: [2]  # the group expects a rank that never comes
    with pytest.raises(WeightSyncError, match="not done after 3 s"):
        engine.connect_weight_sync("127.0.0.1", free_port(), group_name="never_complete", backend="gloo")
    engine.shutdown()


def test_servers_without_a_router_form_a_pool_that_survives_a_dead_one(servers, tmp_path):
    """The trainer's remote SGLang (megacredit/trainer/builder.py) without rollout.router_url: an
    EnginePool of one engine per server, each with a broadcast group of its own (distinct names in
    this process); a server that dies leaves the pool and its prompts go to the other (the gathered
    batch equals the survivor's alone), and shutting down skips the dead server's side of its group.
    With a router: one engine over the router."""
    from safetensors.torch import save_file

    from megacredit.config import load_config
    from megacredit.rollout.pool import EnginePool
    from megacredit.trainer.builder import _build_sglang

    pairs = _weights()
    save_file({n: t.contiguous() for n, t in pairs}, str(tmp_path / "model.safetensors"))
    a, router, _ = servers
    remote = ["rollout.engine=sglang", "rollout.placement=remote"]
    params = SamplingParams(temperature=0.7, max_new_tokens=3, n=2, seed=11)
    with running_server() as doomed:
        pool = _build_sglang(load_config(None, [*remote, f"rollout.urls=[{a}, {doomed}]"]), None, tmp_path)
        assert isinstance(pool, EnginePool) and [e.workers for e in pool.members] == [[a], [doomed]]
        pool.update_weights_from_buckets([pairs], manifest_of(pairs))
        names = [body["group_name"] for url in (a, doomed) for _, path, body in server_state(url)["requests"]
                 if path == "/init_weights_update_group"]
        assert len(set(names)) == 2 and all(name.startswith("megacredit_pp0") for name in names), names
        for url in (a, doomed):
            _assert_received(server_state(url)["received"], pairs)
    survived = pool.generate(PROMPTS, params)
    assert [(f.engine, f.during) for f in pool.take_faults()] == [(f"engine 1 ({doomed})", "generate")]
    assert _tokens(survived) == _tokens(SGLangServerEngine([a]).generate(PROMPTS, params))
    pool.shutdown()  # the dead server's side of its group is gone with it: no error
    routed = _build_sglang(load_config(None, [*remote, f"rollout.urls=[{a}]", f"rollout.router_url={router}"]),
                           None, tmp_path)
    assert isinstance(routed, SGLangServerEngine) and routed.router_url == router
    routed.shutdown()


def test_an_engine_that_left_the_pool_joins_its_server_to_a_new_group(servers):
    """``restart()`` (the pool's call when an engine leaves it) on a server megacredit did not
    start: False, but the engine forgets its group, so a server restarted by somebody else (which
    has no group) is joined to a new one by the next update instead of being sent buckets for a
    group it lacks."""
    pairs = _weights()
    url = servers[0]
    engine = SGLangServerEngine([url], sync_backend="gloo")
    engine.update_weights_from_buckets([pairs], manifest_of(pairs))
    first = engine._group_name
    assert engine.restart() is False and engine._group is None
    reset_server(url)
    engine.update_weights_from_buckets([pairs], manifest_of(pairs))
    inits = [body for _, path, body in server_state(url)["requests"] if path == "/init_weights_update_group"]
    assert len(inits) == 1 and inits[0]["group_name"] not in (first, None), (first, inits)
    _assert_received(server_state(url)["received"], pairs)
    engine.shutdown()
