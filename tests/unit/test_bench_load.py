"""The load generator's logic without a server: histograms, the open-loop schedule, the loops, JSON shapes.

The loops run against fake calls (coroutines that answer after a set delay or with a set error), so
what is asserted follows from the schedule's arithmetic, never from how fast this machine is.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import load as load_cmd
from bench.compare import ratios
from bench.load_payload import Payload, make_payload
from bench.load_procs import Driver, decode_payload, encode_payload
from bench.load_profile import batch_delta, summarize_collapsed
from bench.load_runner import LoadSpec, PhaseResult, burst_round, closed_loop, open_loop
from bench.load_stats import (
    HIGHEST_US,
    LOWEST_US,
    TALLY_MAX_KEYS,
    WRONG_ANSWER,
    Recorder,
    intended_send_ns,
    new_histogram,
    percentile_ms,
    split,
    summary,
    tickets_in,
)
from bench.load_targets import (
    HttpConnection,
    grpc_request_bytes,
    grpc_response_outputs,
    rest_request_bytes,
    rest_response_outputs,
)
from bench.report import fill_markdown

Call = Callable[[bool], Awaitable[str | None]]
#: Keys `bench load --json` must write (the issue's list).
REQUIRED_KEYS = {
    "protocol",
    "model",
    "concurrency",
    "duration_s",
    "requests",
    "rps",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "errors",
}


def _identity() -> Payload:
    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    return Payload("identity", {"INPUT0": x}, {"OUTPUT0": x.copy()})


# ---- histograms ----------------------------------------------------------------------------------


def test_recorder_percentiles_errors_and_checks() -> None:
    rec = Recorder(check_every=3)
    for ms in range(1, 101):  # 1..100 ms
        rec.record(ms * 1_000_000)
    rec.record(5_000_000, "UNAVAILABLE")
    rec.record(5_000_000, "UNAVAILABLE", count=2)
    assert rec.ok == 100 and rec.count == 103
    assert rec.errors == {"UNAVAILABLE": 3}
    assert percentile_ms(rec.histogram, 50) == pytest.approx(50, rel=0.01)
    assert percentile_ms(rec.histogram, 99) == pytest.approx(99, rel=0.01)
    assert percentile_ms(rec.histogram, 100) == pytest.approx(100, rel=0.01)
    assert [rec.should_check() for _ in range(7)] == [True, False, False, True, False, False, True]


def test_histograms_merge_exactly(rng: np.random.Generator) -> None:
    latencies = rng.integers(10_000, 500_000_000, 5_000)
    whole, parts = Recorder(), [Recorder() for _ in range(3)]
    for i, ns in enumerate(latencies):
        whole.record(int(ns))
        parts[i % 3].record(int(ns))
    parts[1].record(0, "RESOURCE_EXHAUSTED")
    merged = Recorder()
    for part in parts:  # through the JSON form, as client processes send them
        merged.merge(Recorder.decode(json.loads(json.dumps(part.encode()))))
    assert merged.ok == whole.ok == len(latencies)
    assert merged.errors == {"RESOURCE_EXHAUSTED": 1}
    for p in (0, 50, 90, 99, 99.9, 100):
        assert percentile_ms(merged.histogram, p) == percentile_ms(whole.histogram, p)


def test_tallied_latencies_make_the_histogram_of_recording_each(rng: np.random.Generator) -> None:
    # Narrow (a closed loop's few ms) and spread (more distinct microseconds than the tally holds,
    # so it folds on its own), read halfway: the histogram is the one recording each value makes.
    narrow = rng.integers(800_000, 3_000_000, 20_000)
    spread = rng.integers(-5_000, 10**14, 3 * TALLY_MAX_KEYS)
    rec, direct = Recorder(), new_histogram()
    for i, ns in enumerate([*narrow.tolist(), *spread.tolist()]):
        rec.record(ns, count=1 + i % 3)
        direct.record_value(min(HIGHEST_US, max(LOWEST_US, (ns + 500) // 1000)), 1 + i % 3)
        if i == 9_999:
            assert rec.ok == int(direct.get_total_count())
            assert percentile_ms(rec.histogram, 50) == percentile_ms(direct, 50)
        assert len(rec._tally) <= TALLY_MAX_KEYS
    assert rec.ok == int(direct.get_total_count())
    assert rec.histogram.encode() == direct.encode()
    assert Recorder.decode(rec.encode()).histogram.encode() == direct.encode()


def test_empty_recorder_round_trips_and_summarises() -> None:
    empty = Recorder.decode(Recorder().encode())
    assert empty.ok == 0
    out = summary(empty, 1.0)
    assert out["requests"] == 0 and out["p50_ms"] is None and out["cdf"] == []


def test_latencies_outside_the_range_are_clamped() -> None:
    rec = Recorder()
    rec.record(0)
    rec.record(10**15)  # 11 days
    assert rec.ok == 2
    assert percentile_ms(rec.histogram, 100) == pytest.approx(120_000, rel=0.01)


# ---- the open-loop schedule --------------------------------------------------------------------------


def test_intended_send_times_are_evenly_spaced_from_the_start() -> None:
    start = 1_000_000_000
    due = [intended_send_ns(start, i, 1000.0) for i in range(5)]
    assert due == [start + i * 1_000_000 for i in range(5)]
    # no drift: request 1e6 of a 3/s run is due exactly 1e6/3 s after the start (rounded to 1 ns)
    assert intended_send_ns(0, 1_000_000, 3.0) == round(1_000_000 * 1e9 / 3.0)


@pytest.mark.parametrize(
    ("duration", "rate", "expected"), [(1.0, 100.0, 100), (0.5, 3.0, 2), (10.0, 0.1, 1), (0.0, 50.0, 0)]
)
def test_tickets_in_a_window(duration: float, rate: float, expected: int) -> None:
    assert tickets_in(duration, rate) == expected


def test_schedule_refuses_a_rate_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="rate"):
        intended_send_ns(0, 1, 0.0)
    with pytest.raises(ValueError, match="rate"):
        tickets_in(1.0, -1.0)


def test_split_among_client_processes() -> None:
    assert split(10, 3) == [4, 3, 3]
    assert split(500, 4) == [125] * 4
    assert split(300.0, 4) == [75.0] * 4
    with pytest.raises(ValueError):
        split(3, 0)


# ---- the spec ------------------------------------------------------------------------------------


def test_load_spec_modes_shares_and_json() -> None:
    closed = LoadSpec(concurrency=64)
    assert closed.mode == "closed" and closed.slots == 64 and closed.phases == 1
    open_ = LoadSpec(concurrency=10, rate=100.0)
    assert open_.mode == "open"
    burst = LoadSpec(burst=500, rounds=5)
    assert burst.mode == "burst" and burst.slots == 500 and burst.phases == 5
    shares = burst.share(3)
    assert sum(s.burst or 0 for s in shares) == 500
    assert sum(s.rate or 0 for s in open_.share(4)) == pytest.approx(100.0)
    assert sum(s.concurrency for s in closed.share(5)) == 64
    assert LoadSpec.from_json(json.loads(json.dumps(burst.to_json()))) == burst
    with pytest.raises(ValueError, match="client processes"):
        LoadSpec(concurrency=2).share(3)


@pytest.mark.parametrize(
    "bad", [{"protocol": "http"}, {"concurrency": 0}, {"rate": 0.0}, {"burst": 0}, {"duration_s": 0.0}]
)
def test_load_spec_refuses_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LoadSpec(**bad)


# ---- the loops against fake calls --------------------------------------------------------------------


def _fake(delay_s: float = 0.0, outcome: str | None = None, log: list[bool] | None = None) -> Call:
    async def call(check: bool) -> str | None:
        if log is not None:
            log.append(check)
        await asyncio.sleep(delay_s)
        return outcome

    return call


def test_closed_loop_keeps_each_slot_busy_and_counts_errors() -> None:
    rec = Recorder(check_every=5)
    checks: list[bool] = []
    calls = [_fake(0.001, log=checks), _fake(0.001, "UNAVAILABLE")]
    result = asyncio.run(closed_loop(calls, rec, 0.05))
    assert rec.ok >= 1 and rec.errors["UNAVAILABLE"] >= 1
    assert rec.count == len(checks) + rec.errors["UNAVAILABLE"]
    # every 5th answer overall is checked; failed ones are not counted as checked
    assert 1 <= rec.checked <= sum(checks)
    assert result.end_ns > result.start_ns


def test_open_loop_charges_stalls_to_the_requests_that_waited() -> None:
    """One slot, 20 requests due over 0.1 s, each taking >= 20 ms: request i cannot leave before
    20*i ms though due at 5*i ms, so the last (i = 19) leaves >= 285 ms late and takes >= 305 ms from
    its due time. A closed-loop (coordinated-omission) measurement would report ~20 ms for each."""
    rec = Recorder()
    asyncio.run(open_loop([_fake(0.02)], rec, 0.1, 200.0))
    assert rec.ok == 20
    worst = percentile_ms(rec.histogram, 100)
    assert worst is not None and worst >= 19 * 20 - 19 * 5 + 20 - 1  # 305 ms, less rounding
    assert rec.max_lag_ns >= (19 * 20 - 19 * 5) * 1_000_000 - 1_000_000


def test_open_loop_sends_exactly_the_due_requests() -> None:
    rec = Recorder()
    asyncio.run(open_loop([_fake() for _ in range(4)], rec, 0.05, 400.0))
    assert rec.count == tickets_in(0.05, 400.0) == 20


def test_burst_releases_every_call_before_any_answer() -> None:
    started: list[int] = []
    gate = asyncio.Event()
    n = 50

    def call_factory() -> Call:
        async def call(check: bool) -> str | None:
            started.append(1)
            if len(started) == n:
                gate.set()
            await gate.wait()  # no answer until all n are out
            return None

        return call

    rec = Recorder()
    result = asyncio.run(burst_round([call_factory() for _ in range(n)], rec))
    assert rec.ok == n and len(started) == n
    assert result.end_ns >= result.start_ns


def test_wrong_answers_are_errors_and_checked() -> None:
    rec = Recorder(check_every=1)
    asyncio.run(burst_round([_fake(outcome=WRONG_ANSWER) for _ in range(3)], rec))
    assert rec.errors == {WRONG_ANSWER: 3} and rec.checked == 3


def test_phase_results_merge_over_the_union_of_windows() -> None:
    a, b = Recorder(), Recorder()
    a.record(1_000_000)
    b.record(3_000_000)
    merged = PhaseResult.merged(
        [PhaseResult(a, 100, 500), PhaseResult.decode(PhaseResult(b, 50, 400).encode())]
    )
    assert (merged.start_ns, merged.end_ns, merged.recorder.ok) == (50, 500, 2)


# ---- JSON of a whole run -------------------------------------------------------------------------


class _FakeDriver(Driver):
    """Phases of 100 requests at 2 ms in 0.1 s, without any client or server."""

    def __init__(self, spec: LoadSpec, *_: Any) -> None:
        self.spec = spec
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def phase(self) -> PhaseResult:
        rec = Recorder()
        rec.record(2_000_000, count=100)
        rec.record(0, "RESOURCE_EXHAUSTED")
        return PhaseResult(rec, 0, 100_000_000)

    def stop(self) -> None:
        self.stopped = True


@pytest.mark.parametrize("burst", [None, 10])
def test_measure_writes_the_documented_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, burst: int | None
) -> None:
    monkeypatch.setattr(load_cmd, "make_driver", lambda spec, *a: _FakeDriver(spec))
    monkeypatch.setattr(load_cmd, "ROUND_GAP_S", 0.0)
    spec = LoadSpec(concurrency=10, burst=burst, rounds=3)
    result = load_cmd.stamp(load_cmd.measure(spec, "127.0.0.1:1", payload=_identity(), progress=False))
    written = json.loads(load_cmd.write_json(result, tmp_path / "out" / "r.json").read_text())
    assert written.keys() >= REQUIRED_KEYS
    phases = 3 if burst else 1
    assert written["requests"] == 100 * phases
    assert written["errors"] == phases and written["errors_by_code"] == {"RESOURCE_EXHAUSTED": phases}
    assert written["duration_s"] == pytest.approx(0.1 * phases)
    assert written["rps"] == pytest.approx(1000.0)
    assert written["p50_ms"] == pytest.approx(2.0, rel=0.01)
    assert written["mode"] == ("burst" if burst else "closed")
    if burst:
        assert len(written["rounds"]) == 3
        assert all(
            REQUIRED_KEYS - {"protocol", "model", "concurrency"} <= r.keys() for r in written["rounds"]
        )
        # each round has its own CPU per process, per request of that round
        for r in written["rounds"]:
            client = r["cpu"]["processes"]["client"]
            assert client["cpu_s"] >= 0 and r["cpu"]["window_s"] >= 0
            # (cpu_s is rounded to 0.1 ms, us_per_request computed before)
            assert client["us_per_request"] == pytest.approx(client["cpu_s"] * 1e6 / 100, abs=0.6)
        assert sum(r["cpu"]["processes"]["client"]["cpu_s"] for r in written["rounds"]) <= (
            written["cpu"]["processes"]["client"]["cpu_s"] + 0.001
        )
    else:
        assert "rounds" not in written
    assert "client" in written["cpu"]["processes"]
    assert written["machine"]["cpus"] >= 1
    assert "100 ok" in load_cmd.format_result(written) or "300 ok" in load_cmd.format_result(written)


# ---- requests and answers ----------------------------------------------------------------------------


def test_payload_round_trips_through_json_and_verifies() -> None:
    payload = _identity()
    again = decode_payload(json.loads(json.dumps(encode_payload(payload))))
    assert again.model == "identity"
    np.testing.assert_array_equal(again.inputs["INPUT0"], payload.inputs["INPUT0"])
    assert again.verify({"OUTPUT0": payload.inputs["INPUT0"]})
    assert not again.verify({"OUTPUT0": payload.inputs["INPUT0"] + 1})
    assert not again.verify({"OUTPUT0": payload.inputs["INPUT0"].reshape(8)})
    assert not again.verify({})


def test_builtin_payloads() -> None:
    simple = make_payload("simple")
    assert simple.expected is not None
    np.testing.assert_array_equal(
        simple.expected["OUTPUT1"], simple.inputs["INPUT0"] - simple.inputs["INPUT1"]
    )
    echo = make_payload("identity", echo=True)
    assert echo.expected is not None and set(echo.expected) == {"OUTPUT0"}
    with pytest.raises(ValueError, match="unknown model"):
        make_payload("nope")


def test_grpc_request_bytes_parse_back() -> None:
    from protos import grpc_service_pb2 as pb

    payload = _identity()
    request = pb.ModelInferRequest.FromString(grpc_request_bytes(payload))
    assert request.model_name == "identity" and list(request.inputs[0].shape) == [1, 8]
    assert request.raw_input_contents[0] == payload.inputs["INPUT0"].tobytes()
    response = pb.ModelInferResponse(model_name="identity")
    response.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1, 8])
    response.raw_output_contents.append(payload.inputs["INPUT0"].tobytes())
    assert payload.verify(grpc_response_outputs(response.SerializeToString()))


def test_rest_request_and_binary_response() -> None:
    payload = _identity()
    raw = rest_request_bytes("127.0.0.1", payload)
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /v2/models/identity/infer HTTP/1.1")
    assert f"Content-Length: {len(body)}".encode() in head
    header = json.dumps(
        {
            "outputs": [
                {
                    "name": "OUTPUT0",
                    "datatype": "FP32",
                    "shape": [1, 8],
                    "parameters": {"binary_data_size": 32},
                }
            ]
        }
    ).encode()
    response_head = f"HTTP/1.1 200 OK\r\nInference-Header-Content-Length: {len(header)}\r\n".encode()
    outputs = rest_response_outputs(response_head, header + payload.inputs["INPUT0"].tobytes())
    assert payload.verify(outputs)
    as_json = json.dumps(
        {"outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 8], "data": list(range(8))}]}
    ).encode()
    assert payload.verify(rest_response_outputs(b"HTTP/1.1 200 OK\r\n", as_json))


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


def test_http_connection_parses_responses_split_anywhere() -> None:
    body = b'{"ok":true}'
    response = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    async def run() -> list[tuple[int, bytes, bytes]]:
        answers = []
        for cut in (1, 10, len(response) - 1):
            conn = HttpConnection()
            conn.connection_made(_Transport())  # type: ignore[arg-type]
            future = conn.request(b"GET / HTTP/1.1\r\n\r\n")
            conn.data_received(response[:cut])
            assert not future.done()
            conn.data_received(response[cut:] + b"HTTP/1.1 2")  # the next answer's start stays buffered
            answers.append(await future)
        return answers

    for status, _, got in asyncio.run(run()):
        assert (status, got) == (503, body)


def test_http_connection_lost_fails_the_request() -> None:
    async def run() -> None:
        conn = HttpConnection()
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        future = conn.request(b"x")
        conn.connection_lost(None)
        assert conn.closed
        with pytest.raises(ConnectionError):
            await future

    asyncio.run(run())


# ---- profiles, comparisons, the report ---------------------------------------------------------------


def test_summarize_collapsed_stacks() -> None:
    text = "\n".join(
        [
            "main (app.py:1);serve (grpc/aio/_server.py:10);parse (codec.py:5) 30",
            "main (app.py:1);serve (grpc/aio/_server.py:12) 50",
            "main (app.py:2);compute (model.py:3) 20",
            "garbage",
        ]
    )
    out = summarize_collapsed(text)
    assert out["samples"] == 100
    assert out["self"][0] == ["serve (grpc/aio/_server.py)", 50.0]
    assert ["serve (grpc/aio/_server.py)", 80.0] in out["total"]
    assert "main (app.py)" not in {name for name, _ in out["total"]}  # on every stack: not a hot spot
    assert summarize_collapsed("") == {"samples": 0}


def test_compare_ratios() -> None:
    rows = [
        {"target": "engine", "rps": 1000.0, "p99_ms": 10.0},
        {"target": "echo", "rps": 2000.0, "p99_ms": 5.0},
        {"target": "engine-zmq", "rps": 2500.0, "p99_ms": 4.0},
        {"target": "engine-rest", "rps": 900.0, "p99_ms": 20.0},
        {"target": "fastapi-torch", "rps": 300.0, "p99_ms": None},
    ]
    out = ratios(rows)
    assert out["rps_vs_engine"] == {
        "engine": 1.0,
        "echo": 2.0,
        "engine-zmq": 2.5,
        "engine-rest": 0.9,
        "fastapi-torch": 0.3,
    }
    assert out["p99_vs_engine"]["fastapi-torch"] is None
    assert out["engine_over_echo_rps"] == 0.5
    assert out["engine_zmq_over_grpc_rps"] == 2.5
    assert out["engine_rest_over_fastapi_rps"] == 3.0


def test_fill_markdown_rewrites_only_generated_blocks() -> None:
    block = "<!-- generated:{} -->\n{}\n<!-- /generated -->\n"
    text = "intro\n" + block.format("a", "old") + "middle\n" + block.format("b", "keep")
    out = fill_markdown(text, {"a": "new | table"})
    assert out == "intro\n" + block.format("a", "new | table") + "middle\n" + block.format("b", "keep")


def test_plots_are_written(tmp_path: Path) -> None:
    from bench.report import plot_cdf, plot_sweep

    rows = []
    for protocol, base in (("grpc", 2.0), ("zmq", 1.0)):
        for c in (1, 64):
            rec = Recorder()
            for i in range(1, 200):
                rec.record(int(base * c**0.5 * 1e6 * (1 + i / 100)))
            rows.append(
                {
                    "protocol": protocol,
                    "concurrency": c,
                    "target": "engine",
                    "burst": None,
                    **summary(rec, 1.0),
                }
            )
    for path in (plot_cdf(rows, tmp_path / "cdf.png"), plot_sweep(rows, tmp_path / "sweep.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_delta_reads_both_stats_shapes() -> None:
    own_before = {"execution_count": 10, "inference_count": 10, "queue_ns": 0, "batch_stats": {"1": 10}}
    own_after = {
        "execution_count": 14,
        "inference_count": 74,
        "queue_ns": 64_000_000,
        "batch_stats": {"1": 12, "32": {"count": 2, "compute_ns": 8_000_000}},
    }
    out = batch_delta(own_before, own_after)
    assert out is not None
    assert (out["batches"], out["rows"], out["mean_batch"]) == (4, 64, 16.0)
    assert out["sizes"] == {"1": 2, "32": 2}
    assert out["queue_ms_per_request"] == 1.0
    triton = {
        "execution_count": 3,
        "inference_count": 40,
        "inference_stats": {"queue": {"count": 40, "ns": 0}},
        "batch_stats": [
            {"batch_size": 8, "compute_infer": {"count": 1, "ns": 1_000_000}},
            {"batch_size": 32, "compute_infer": {"count": 2, "ns": 5_000_000}},
        ],
    }
    out = batch_delta({"execution_count": 0, "inference_count": 0}, triton)
    assert out is not None and out["sizes"] == {"8": 1, "32": 2} and out["compute_ms_per_batch"] == 2.0
    assert batch_delta(None, triton) is None


def test_compare_keeps_the_median_run_of_each_row() -> None:
    from bench.compare import _median_run

    runs = [{"rps": 900.0, "run": 1}, {"rps": 1200.0, "run": 2}, {"rps": 1000.0, "run": 3}]
    median = _median_run(runs)
    assert median["run"] == 3 and median["runs_rps"] == [900.0, 1200.0, 1000.0]
    assert _median_run(runs[:2])["run"] == 1  # even count: the lower middle


@pytest.mark.parametrize("client", ["zmtp", "pyzmq"])
def test_zmq_target_matches_replies_to_requests_and_checks_them(client: str) -> None:
    import threading

    import zmq

    from bench.load_targets import make_target
    from servers.zmq_protocol import decode_request, encode_reply

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def echo_out_of_order() -> None:
        # answers in reverse order of arrival, in pairs: replies must be matched by request id
        held: list[list[bytes]] = []
        while not stop.is_set():
            if not router.poll(20):
                continue
            peer, *frames = router.recv_multipart()
            request = decode_request(frames)
            x = request.inputs[0]
            out = np.frombuffer(x.data, np.float32).reshape(x.shape)
            reply = encode_reply(request.request_id, {"OUTPUT0": out})
            held.append([peer, *(bytes(f) for f in reply)])
            if len(held) == 2:
                for message in reversed(held):
                    router.send_multipart(message)
                held.clear()

    server = threading.Thread(target=echo_out_of_order, daemon=True)
    server.start()

    async def scenario() -> list[str | None]:
        target = make_target("zmq", f"127.0.0.1:{port}", _identity(), timeout_s=10.0, zmq_client=client)
        await target.open()
        try:
            calls = [target.slot() for _ in range(8)]
            return list(await asyncio.gather(*(call(True) for call in calls)))
        finally:
            await target.close()

    try:
        outcomes = asyncio.run(scenario())
    finally:
        stop.set()
        server.join(5)
        router.close(linger=0)
        ctx.term()
    assert outcomes == [None] * 8


@pytest.mark.parametrize("client", ["zmtp", "pyzmq"])
def test_zmq_target_counts_unanswered_requests_as_timeouts(client: str) -> None:
    # one sweep timer expires every request past its timeout (there is no timer per request)
    import zmq

    from bench.load_targets import make_target

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)  # takes the requests and never answers
    port = router.bind_to_random_port("tcp://127.0.0.1")

    async def scenario() -> tuple[list[str | None], float]:
        target = make_target("zmq", f"127.0.0.1:{port}", _identity(), timeout_s=0.3, zmq_client=client)
        await target.open()
        try:
            start = asyncio.get_running_loop().time()
            calls = [target.slot() for _ in range(3)]
            outcomes = list(await asyncio.gather(*(call(False) for call in calls)))
            return outcomes, asyncio.get_running_loop().time() - start
        finally:
            await target.close()

    try:
        outcomes, took = asyncio.run(scenario())
    finally:
        router.close(linger=0)
        ctx.term()
    assert outcomes == ["TIMEOUT"] * 3
    assert took < 5.0  # expired by the sweep soon after 0.3 s, not left hanging
