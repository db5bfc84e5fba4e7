"""OpenAICompatibleLanguageModel against a fake OpenAI server on 127.0.0.1, one mode per failure.

The fake server (``http.server`` in a thread, port 0) speaks the completions JSON of vLLM
with ``return_token_ids`` / ``return_tokens_as_token_ids``: steps of three tokens with
log-probability -0.25 each, echo scoring with -1.0 per prompt token. Each broken mode
must end in a clear error (what, where, a capped snippet of the reply) or in the right
result, within twice the configured timeout (small: 0.5 s). Runs in the main venv.
"""
from __future__ import annotations

import email.utils
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from ppl_scaling.ledger import recording
from ppl_scaling.models.lm import ContextLengthError, draw_seeds
from ppl_scaling.models.openai_backend import (BadResponseError, OpenAICompatibleLanguageModel, ServerError, _Client,
                                               _retry_after)
from ppl_scaling.rng import torch_generator

T = 0.5  # the configured timeout of every test client, seconds
LOGGER = "ppl_scaling.models.openai_backend"
STEP_LP, PROMPT_LP, NEXT_LP = -0.25, -1.0, -0.5


class FakeTokenizer:
    """Characters as token ids (a-z: 97-122); id 3 is EOS."""

    eos_token_id = 3

    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != self.eos_token_id)


def step_tokens(body: dict) -> list[int]:
    """The fake step of a request: three letters from its seed (fewer if max_tokens is smaller)."""
    return [97 + (body.get("seed", 0) + i) % 26 for i in range(min(3, body["max_tokens"]))]


def good_reply(body: dict) -> dict:
    """What vLLM answers to this backend's requests (one choice)."""
    prompt = list(body["prompt"])
    as_ids = body.get("return_tokens_as_token_ids", False)
    if body.get("echo"):
        ids = prompt + [100]
        lps = [None] + [PROMPT_LP] * (len(prompt) - 1) + [NEXT_LP]
        finish, stop_reason = "length", None
    else:
        ids = step_tokens(body)
        lps = [STEP_LP] * len(ids)
        short = len(ids) < body["max_tokens"]
        finish = "stop" if short else "length"
        stop_reason = body["stop"][0] if short and body.get("stop") else None
    choice = {"index": 0, "text": "".join(chr(i) for i in ids), "finish_reason": finish, "stop_reason": stop_reason,
              "token_ids": ids[len(prompt):] if body.get("echo") else ids if body.get("return_token_ids") else None,
              "prompt_token_ids": None}
    if body.get("logprobs") is not None:
        choice["logprobs"] = {"text_offset": list(range(len(ids))), "token_logprobs": lps,
                              "tokens": [f"token_id:{i}" if as_ids else chr(i) for i in ids],
                              "top_logprobs": [None if lp is None else {f"token_id:{i}": lp}
                                               for i, lp in zip(ids, lps)]}
    return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake", "choices": [choice],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids), "total_tokens": len(prompt) + len(ids)}}


def broken(mode: str, reply: dict) -> dict:
    """The reply with one field broken (modes that still send JSON)."""
    choice = reply["choices"][0]
    lp = choice.get("logprobs")
    if mode == "no_logprobs":
        del choice["logprobs"]
    elif mode == "null_logprobs":
        choice["logprobs"] = None
    elif mode == "null_tokens":
        lp["tokens"] = None
    elif mode == "null_token_logprobs":
        lp["token_logprobs"] = None
    elif mode == "null_in_token_logprobs":
        lp["token_logprobs"][1] = None
    elif mode == "nan_logprob":
        lp["token_logprobs"][0] = float("nan")
    elif mode == "positive_logprob":
        lp["token_logprobs"][0] = 0.7
    elif mode == "short_token_logprobs":
        lp["token_logprobs"].pop()
    elif mode == "text_tokens":
        lp["tokens"] = ["a", "b", "c"]
    elif mode == "ids_disagree":
        choice["token_ids"] = [1, 2, 3]
    elif mode == "null_token_ids":
        choice["token_ids"] = None
    elif mode == "no_tokens":
        choice["token_ids"], lp["tokens"], lp["token_logprobs"] = [], [], []
    elif mode == "too_many_tokens":
        lp["tokens"] = lp["tokens"] * 5
        lp["token_logprobs"] = lp["token_logprobs"] * 5
        choice["token_ids"] = choice["token_ids"] * 5
    elif mode == "empty_choices":
        reply["choices"] = []
    elif mode == "two_choices":
        reply["choices"] = [choice, dict(choice, index=1)]
    elif mode == "no_choices":
        del reply["choices"]
    elif mode == "finish_error":
        choice["finish_reason"] = "error"
    elif mode == "abort":
        choice["finish_reason"] = "abort"
    elif mode == "echo_other_row":
        lp["tokens"][0] = "token_id:5"
    elif mode == "list_reply":
        return [reply]
    else:
        raise AssertionError(f"unknown mode {mode}")
    return reply


class FakeServer:
    """A fake vLLM OpenAI server; ``mode`` applies to every completions request, ``plan``
    (a list of modes) to the next ones first."""

    def __init__(self, *, max_model_len: int | None = 4096, model: str = "fake", mode: str = "ok") -> None:
        self.mode, self.plan, self.max_model_len, self.model = mode, [], max_model_len, model
        self.retry_after = "0.3"
        self.requests: list[tuple[str, str, dict, object]] = []  # (method, path, headers, body)
        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def completions(self) -> list[dict]:
        return [b for m, p, h, b in self.requests if p == "/v1/completions"]

    def close(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def send_json(self, status: int, data, headers: dict | None = None) -> None:
        self.send_raw(status, json.dumps(data).encode(), headers)

    def send_raw(self, status: int, raw: bytes, headers: dict | None = None,
                 content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def trickle(self, data: bytes, interval: float = 0.05) -> None:
        for i in range(len(data)):
            if self.server.fake.stopping.wait(interval):
                return
            try:
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
            except OSError:
                return
        self.close_connection = True

    def do_GET(self) -> None:
        fake = self.server.fake
        fake.requests.append(("GET", self.path, dict(self.headers), None))
        if self.path.endswith("/models"):
            if fake.mode == "models_bad_json":
                return self.send_raw(200, b"<html>not an API</html>", content_type="text/html")
            card = {"id": fake.model, "object": "model"}
            if fake.max_model_len is not None:
                card["max_model_len"] = fake.max_model_len
            return self.send_json(200, {"object": "list", "data": [card]})
        self.send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        fake = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        fake.requests.append(("POST", self.path, dict(self.headers), body))
        if self.path == "/tokenize":
            if fake.mode == "tokenize_null":
                return self.send_json(200, {"tokens": None})
            return self.send_json(200, {"tokens": [ord(c) for c in body["prompt"]], "count": len(body["prompt"])})
        if self.path == "/detokenize":
            return self.send_json(200, {"prompt": "".join(chr(i) for i in body["tokens"])})
        if self.path != "/v1/completions":
            return self.send_json(404, {"error": {"message": f"no route {self.path}"}})
        mode = fake.plan.pop(0) if fake.plan else fake.mode
        if fake.max_model_len is None and fake.mode == "small_context" and len(body["prompt"]) + body["max_tokens"] > 16:
            return self.send_json(400, {"error": {"message": "This model's maximum context length is 16 tokens. "
                                                             f"However, you requested {len(body['prompt'])} tokens "
                                                             f"in the prompt and {body['max_tokens']} to generate.",
                                                  "type": "BadRequestError", "code": 400}})
        reply = good_reply(body)
        raw = json.dumps(reply).encode()
        if mode in ("ok", "small_context"):
            return self.send_raw(200, raw)
        if mode == "close_after":  # answer, then close the kept-alive connection without saying so
            self.send_raw(200, raw)
            self.close_connection = True
            return
        if mode == "malformed_json":
            return self.send_raw(200, b'{"id": "cmpl-1", "choices": [{"index": 0, "text": "abc", ' + b"x" * 400)
        if mode == "html":
            return self.send_raw(200, b"<html><body>Bad gateway</body></html>", content_type="text/html")
        if mode in ("503", "429", "500"):
            headers = {"Retry-After": fake.retry_after} if mode != "500" and fake.retry_after else None
            return self.send_json(int(mode), {"error": {"message": f"fake overload {mode}"}}, headers)
        if mode == "400":
            return self.send_json(400, {"error": {"message": "max_tokens must be at least 1, got -3."}})
        if mode == "trickle_body":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.flush()
            return self.trickle(raw)
        if mode == "trickle_headers":
            head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"p" * 200 +
                    b"\r\nContent-Length: " + str(len(raw)).encode() + b"\r\n\r\n")
            return self.trickle(head + raw)
        if mode == "hang":
            fake.stopping.wait(30)
            self.close_connection = True
            return
        if mode == "truncated":  # promises the whole reply, sends 20 bytes, closes
            self.send_response(200)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw[:20])
            self.close_connection = True
            return
        if mode == "huge_announced":
            self.send_response(200)
            self.send_header("Content-Length", str(10 ** 10))
            self.end_headers()
            self.close_connection = True
            return
        if mode == "endless":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = b"[" * 65536
            try:
                while not fake.stopping.is_set():
                    self.wfile.write(chunk)
            except OSError:
                pass
            self.close_connection = True
            return
        self.send_json(200, broken(mode, reply))


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture
def make_lm():
    made = []

    def make(urls, **kwargs):
        kwargs = {"timeout": T, "max_retries": 3, "tokenizer": FakeTokenizer(), "jitter_seed": 0, **kwargs}
        lm = OpenAICompatibleLanguageModel(urls, "fake", **kwargs)
        made.append(lm)
        return lm

    yield make
    for lm in made:
        lm.close()


def step(lm, rows=([104, 105, 106],), max_tokens=8, stop="\n"):
    return lm.request_steps([list(r) for r in rows], stop=stop, max_tokens=max_tokens, temperature=1.0,
                            seeds=list(range(len(rows))))


def timed(fn, *args, **kwargs):
    t0 = time.monotonic()
    try:
        return fn(*args, **kwargs), time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 (returned for the test to inspect)
        return e, time.monotonic() - t0


# --------------------------------------------------------------------------- good replies


def test_good_server_gives_the_steps_and_logprobs(server, make_lm):
    lm = make_lm(server.url)
    assert lm.context_length == 4096 and "max_model_len reported by" in lm.context_source
    ctx = lm.start([[104, 105]]).take(np.zeros(3, dtype=np.int64))
    s = lm.sample_steps(ctx, step_delimiter="\n", max_step_tokens=8, temperature=1.0,
                        generator=torch_generator(np.random.default_rng(0)))
    sent = server.completions()
    assert [b["seed"] for b in sent] and all(b["prompt"] == [104, 105] for b in sent)
    assert all(b["return_tokens_as_token_ids"] and b["logprobs"] == 0 and b["stop"] == ["\n"] for b in sent)
    seeds = draw_seeds(torch_generator(np.random.default_rng(0)), 3)  # the requests' seeds, in row order
    assert sorted(b["seed"] for b in sent) == sorted(seeds)
    assert s.token_ids == [step_tokens({"seed": seed, "max_tokens": 8}) for seed in seeds]
    np.testing.assert_allclose(s.log_q, 3 * STEP_LP)
    np.testing.assert_allclose(s.log_p, 3 * STEP_LP)  # tau = 1: log p = log q
    assert s.delimited.all() and not s.eos.any()
    # tau != 1: log p from an echo request of context + step
    with recording() as L:
        s = lm.sample_steps(ctx, step_delimiter="\n", max_step_tokens=8, temperature=0.5,
                            generator=torch_generator(np.random.default_rng(0)))
    np.testing.assert_allclose(s.log_p, 3 * PROMPT_LP)
    assert L.prefill_tokens == 3 * 2 + 3 * 5  # the contexts, then context + step scored
    scores = lm.token_logprobs([[104, 105, 106, 107]])
    np.testing.assert_allclose(scores[0], [PROMPT_LP] * 3)
    assert lm.client.retries == 0


def test_logprobs_false_reads_token_ids(server, make_lm):
    lm = make_lm(server.url, logprobs=False)
    (reply,) = step(lm)
    assert reply.token_ids == step_tokens(server.completions()[0]) and reply.logprobs is None


def test_a_server_closing_idle_connections_costs_no_retry(server, make_lm, caplog):
    server.mode = "close_after"
    lm = make_lm(server.url, max_concurrency=1)  # one worker thread: its kept-alive connection is reused
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for _ in range(4):
            step(lm)
    assert lm.client.retries == 0 and not [r for r in caplog.records if r.levelno >= logging.INFO]
    assert sum("closed by the server" in r.getMessage() for r in caplog.records) == 3  # reopened, silently


# --------------------------------------------------------------------------- malformed replies

MALFORMED = {  # mode -> words the error must contain
    "no_logprobs": "'logprobs' is missing",
    "null_logprobs": "'logprobs' is null",
    "null_tokens": "'logprobs.tokens' is null",
    "null_token_logprobs": "'logprobs.token_logprobs' is null",
    "null_in_token_logprobs": "log-probability 1 is null",
    "nan_logprob": "log-probability 0 is nan",
    "positive_logprob": "log-probability 0 is 0.7",
    "short_token_logprobs": "2 log-probabilities for 3 tokens",
    "text_tokens": "not a token id",
    "ids_disagree": "disagree",
    "no_tokens": "no tokens in the step",
    "too_many_tokens": "15 tokens for max_tokens=8",
    "empty_choices": "expected exactly 1 choice, got 0",
    "two_choices": "expected exactly 1 choice, got 2",
    "no_choices": "no 'choices' list",
    "list_reply": "expected a JSON object, got list",
    "finish_error": "finish_reason is 'error'",
    "malformed_json": "invalid JSON",
    "html": "invalid JSON",
}


@pytest.mark.parametrize("mode", list(MALFORMED))
def test_a_malformed_reply_is_a_clear_error(server, make_lm, mode):
    server.mode = mode
    lm = make_lm(server.url)
    err, elapsed = timed(step, lm)
    assert isinstance(err, BadResponseError), err
    msg = str(err)
    assert MALFORMED[mode] in msg and server.url in msg and "reply: '" in msg
    assert len(msg) < 600  # the reply is quoted, capped
    assert len(server.completions()) == 1  # not retried: a malformed reply would come again
    assert elapsed < 2 * T


def test_null_token_ids_without_logprobs_is_a_clear_error(server, make_lm):
    server.mode = "null_token_ids"
    lm = make_lm(server.url, logprobs=False)
    with pytest.raises(BadResponseError, match="'token_ids' is null"):
        step(lm)


@pytest.mark.parametrize("mode,words", [("null_in_token_logprobs", "log-probability 1 is null"),
                                        ("echo_other_row", "is not the row sent"),
                                        ("null_logprobs", "'logprobs' is null")])
def test_a_malformed_scoring_reply_is_a_clear_error(server, make_lm, mode, words):
    server.mode = mode
    lm = make_lm(server.url)
    with pytest.raises(BadResponseError, match=words):
        lm.token_logprobs([[104, 105, 106, 107]])


def test_an_aborted_request_is_retried(server, make_lm):
    server.plan = ["abort"]
    lm = make_lm(server.url)
    (reply,) = step(lm)
    assert len(reply.token_ids) == 3 and lm.client.retries == 1


def test_malformed_models_list_and_tokenizer_replies(make_lm):
    s = FakeServer(mode="models_bad_json")
    try:
        with pytest.raises(BadResponseError, match=r"/v1/models\) answered HTTP 200 with invalid JSON.*<html>"):
            make_lm(s.url)
        s.mode = "tokenize_null"
        lm = make_lm(s.url, tokenizer=None)  # the server's /tokenize
        with pytest.raises(BadResponseError, match="'tokens' is null"):
            lm.encode("abc")
        assert lm.decode([97, 98]) == "ab"
    finally:
        s.close()


def test_replies_too_large_are_refused(server, make_lm):
    lm = make_lm(server.url)
    server.mode = "huge_announced"
    err, elapsed = timed(step, lm)
    assert isinstance(err, BadResponseError) and "announced a reply of 10000000000 bytes" in str(err)
    server.mode = "endless"
    err, elapsed = timed(step, lm)
    assert isinstance(err, BadResponseError) and "more than 67108864 bytes" in str(err), err
    assert elapsed < 2 * T


def test_a_truncated_reply_is_a_transport_error_and_retried(server, make_lm):
    server.plan = ["truncated"]
    lm = make_lm(server.url)
    (reply,) = step(lm)
    assert len(reply.token_ids) == 3 and lm.client.retries == 1
    server.mode = "truncated"
    with pytest.raises(ServerError, match="IncompleteRead"):
        step(lm)


# --------------------------------------------------------------------------- deadlines


@pytest.mark.parametrize("mode", ["trickle_body", "trickle_headers", "hang"])
def test_a_stalling_server_fails_within_the_timeout(server, make_lm, mode, caplog):
    """A server sending one byte every 0.05 s (each socket read succeeds; the reply would take
    10-20 s) or none at all: the request fails after about ``timeout``, not retried on the
    same replica."""
    lm = make_lm(server.url)
    server.mode = mode
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        err, elapsed = timed(step, lm)
    assert isinstance(err, ServerError) and "TimeoutError" in str(err) and f"timeout={T:g} s" in str(err), err
    assert "every replica timed out" in str(err) and server.url.removesuffix("/v1") in str(err)
    assert T * 0.9 < elapsed < 2 * T, elapsed
    assert len(server.completions()) == 1
    assert any("marked down" in r.getMessage() for r in caplog.records)


def test_a_stalling_replica_is_replaced_by_a_healthy_one(make_lm, caplog):
    slow, good = FakeServer(mode="trickle_body"), FakeServer()
    try:
        lm = make_lm([slow.url, good.url])
        slow.mode = "trickle_body"
        lm.client.replicas[1].in_flight = 1  # the first attempt goes to the slow replica
        with caplog.at_level(logging.INFO, logger=LOGGER):
            (reply,), elapsed = timed(step, lm)
        lm.client.replicas[1].in_flight = 0
        assert len(reply.token_ids) == 3 and lm.client.retries == 1
        assert elapsed < 2 * T
        messages = [r.getMessage() for r in caplog.records]
        assert any("marked down" in m and slow.url in m for m in messages)
        assert any("retrying" in m for m in messages)
    finally:
        slow.close()
        good.close()


# --------------------------------------------------------------------------- retries


def test_retry_after_seconds_is_honoured(server, make_lm, caplog):
    server.plan, server.retry_after = ["503", "429"], "0.3"
    lm = make_lm(server.url)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        (reply,), elapsed = timed(step, lm)
    assert len(reply.token_ids) == 3 and lm.client.retries == 2
    assert 0.6 <= elapsed < 0.6 + 2 * T
    assert sum("Retry-After: 0.3 s" in r.getMessage() for r in caplog.records) >= 2


def test_retry_after_http_date_is_honoured(server, make_lm):
    server.plan = ["503"]
    server.retry_after = email.utils.formatdate(time.time() + 2, usegmt=True)  # 1-2 s ahead (whole seconds)
    lm = make_lm(server.url, max_wait=5)
    (reply,), elapsed = timed(step, lm)
    assert len(reply.token_ids) == 3 and 0.9 < elapsed < 2.5


def test_retry_after_beyond_max_wait_fails_at_once(server, make_lm):
    server.mode, server.retry_after = "503", "120"
    lm = make_lm(server.url, max_wait=1)
    err, elapsed = timed(step, lm)
    assert isinstance(err, ServerError) and "asked to wait 120.0 s" in str(err) and "max_wait=1" in str(err)
    assert "fake overload 503" in str(err) and elapsed < 2 * T


def test_retry_after_parsing():
    assert _retry_after("2") == 2.0 and _retry_after(" 0.5 ") == 0.5 and _retry_after("-3") == 0.0
    assert _retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert 8 <= _retry_after(email.utils.formatdate(time.time() + 10, usegmt=True)) <= 10
    assert _retry_after("soon") is None and _retry_after("nan") is None and _retry_after(None) is None


def test_retries_are_bounded_backed_off_and_logged(server, make_lm, caplog):
    server.mode, server.retry_after = "429", None
    lm = make_lm(server.url, max_retries=2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        err, elapsed = timed(step, lm)
    assert isinstance(err, ServerError) and "failed after 3 attempt(s) on 1 replica(s) (max_retries=2)" in str(err)
    assert str(err).count("HTTP 429: fake overload 429") == 3
    assert len(server.completions()) == 3 and lm.client.retries == 2
    assert 0.1 + 0.2 <= elapsed < 2 * T  # backoffs 0.2 and 0.4 s, jittered x 0.5-1
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    down = [r for r in caplog.records if "marked down" in r.getMessage()]
    assert len(retries) == 2 and len(down) == 1 and down[0].levelno == logging.WARNING


@pytest.mark.parametrize("mode", ["500", "429", "truncated"])
def test_fast_failures_with_many_retries_end_within_twice_the_timeout(server, make_lm, mode):
    """The backoff waits of one request add up to at most ``timeout``."""
    server.mode, server.retry_after = mode, None
    lm = make_lm(server.url, max_retries=6)
    err, elapsed = timed(step, lm)
    assert isinstance(err, ServerError) and "failed after 7 attempt(s)" in str(err), err
    assert elapsed < 2 * T


def test_max_retries_zero_is_one_attempt(server, make_lm):
    server.mode = "500"
    lm = make_lm(server.url, max_retries=0)
    with pytest.raises(ServerError, match=r"failed after 1 attempt\(s\)"):
        step(lm)
    assert len(server.completions()) == 1


def test_a_failing_replica_is_replaced_and_named(make_lm, caplog):
    bad, good = FakeServer(mode="500"), FakeServer()
    try:
        lm = make_lm([bad.url, good.url])
        with caplog.at_level(logging.INFO, logger=LOGGER):
            replies = step(lm, rows=[[104]] * 6)
        assert all(len(r.token_ids) == 3 for r in replies)
        assert lm.client.replicas[1].served == 6 and any("marked down" in r.getMessage() for r in caplog.records)
        good.mode = "500"
        with pytest.raises(ServerError) as info:
            step(lm)
        assert bad.url in str(info.value) and good.url in str(info.value)
    finally:
        bad.close()
        good.close()


def test_a_client_error_is_not_retried(server, make_lm):
    server.mode = "400"
    lm = make_lm(server.url)
    with pytest.raises(ServerError, match=r"rejected the request \(HTTP 400\): max_tokens must be at least 1"):
        step(lm)
    assert len(server.completions()) == 1


# --------------------------------------------------------------------------- arguments and the API key


@pytest.mark.parametrize("kwargs,words", [
    ({"max_retries": -1}, "max_retries must be an integer >= 0, got -1"),
    ({"max_retries": 1.5}, "max_retries must be an integer"),
    ({"timeout": 0}, "timeout must be a finite number > 0, got 0"),
    ({"timeout": float("nan")}, "timeout must be a finite number > 0"),
    ({"max_concurrency": 0}, "max_concurrency must be an integer >= 1, got 0"),
    ({"cooldown": -1}, "cooldown must be"),
    ({"max_wait": -1}, "max_wait must be"),
    ({"context_length": 1}, "context_length must be an integer >= 2"),
    ({"truncate": "right"}, "truncate must be one of (None, 'left')"),
    ({"base_url": ""}, "non-empty string"),
    ({"base_url": []}, "at least one base_url"),
    ({"base_url": ["http://127.0.0.1:1/v1", "http://127.0.0.1:1/v1/"]}, "listed twice"),
    ({"base_url": "127.0.0.1:8000"}, "is not an http"),
    ({"base_url": "ftp://127.0.0.1:1"}, "is not an http"),
    ({"base_url": "http://127.0.0.1:99999"}, "invalid port"),
    ({"model": ""}, "model must be"),
])
def test_bad_arguments_are_refused_with_clear_messages(kwargs, words):
    kwargs = {"base_url": "http://127.0.0.1:1/v1", "model": "fake", **kwargs}
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        OpenAICompatibleLanguageModel(**kwargs)


def test_the_environment_key_is_never_sent_over_plain_http(server, make_lm, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    lm = make_lm(server.url)
    step(lm)
    assert server.requests and not any("Authorization" in h for _, _, h, _ in server.requests)
    lm = make_lm(server.url, api_key="sk-explicit")
    step(lm)
    assert server.requests[-1][2]["Authorization"] == "Bearer sk-explicit"
    # https: the environment's key unless one is passed ("" sends none); nothing is connected here
    for api_key, want in [(None, "Bearer sk-from-env"), ("sk-explicit", "Bearer sk-explicit"), ("", None)]:
        client = _Client(["https://models.example/v1", "http://127.0.0.1:1/v1"], api_key, 1.0, 0, 1, 0.0)
        assert client.replicas[0].headers.get("Authorization") == want
        assert client.replicas[1].headers.get("Authorization") == ("Bearer sk-explicit" if api_key else None)
        client.close()


# --------------------------------------------------------------------------- context length


def test_an_over_long_request_is_refused_before_sending():
    s = FakeServer(max_model_len=32)
    try:
        lm = OpenAICompatibleLanguageModel(s.url, "fake", tokenizer=FakeTokenizer(), timeout=T)
        assert lm.context_length == 32
        with pytest.raises(ContextLengthError, match=r"max_model_len reported by http://127.*: a context of 30 tokens "
                                                     r"plus 8 new tokens \(38\) exceeds the context length of 32 "
                                                     r"tokens.*truncate='left'") as info:
            step(lm, rows=[[104] * 30])
        assert (info.value.length, info.value.limit) == (38, 32)
        with pytest.raises(ContextLengthError, match=r"a context of 33 tokens plus 1 new tokens \(34\)"):
            lm.token_logprobs([[104] * 33])
        assert s.completions() == []
        step(lm, rows=[[104] * 24])  # 24 + 8 = 32 fits
        lm.close()
        with pytest.raises(ValueError, match=r"context_length=64 exceeds the context the server at .* reports "
                                             r"\(max_model_len=32\)"):
            OpenAICompatibleLanguageModel(s.url, "fake", tokenizer=FakeTokenizer(), context_length=64)
        lm = OpenAICompatibleLanguageModel(s.url, "fake", tokenizer=FakeTokenizer(), context_length=16)
        with pytest.raises(ContextLengthError, match=r"context_length=16\).*exceeds the context length of 16 tokens"):
            step(lm, rows=[[104] * 10])
        lm.close()
    finally:
        s.close()


def test_left_truncation_keeps_the_last_tokens():
    s = FakeServer(max_model_len=32)
    try:
        lm = OpenAICompatibleLanguageModel(s.url, "fake", tokenizer=FakeTokenizer(), timeout=T, truncate="left")
        row = list(range(100, 140))  # 40 tokens
        ctx = lm.start([row])
        out = lm.sample_steps(ctx, step_delimiter="\n", max_step_tokens=8, temperature=1.0,
                              generator=torch_generator(np.random.default_rng(0)))
        assert s.completions()[-1]["prompt"] == row[-24:]
        assert list(out.contexts.ids[0]) == row + out.token_ids[0]
        scores = lm.token_logprobs([row])[0]
        assert s.completions()[-1]["prompt"] == row[-31:]
        assert scores.shape == (39,) and np.isnan(scores[:9]).all()
        np.testing.assert_allclose(scores[9:], PROMPT_LP)
        lm.close()
    finally:
        s.close()


def test_without_a_reported_context_the_servers_error_is_surfaced():
    s = FakeServer(max_model_len=None, mode="small_context")
    try:
        lm = OpenAICompatibleLanguageModel(s.url, "fake", tokenizer=FakeTokenizer(), timeout=T)
        assert lm.context_length is None
        with pytest.raises(ServerError, match=r"HTTP 400\): This model's maximum context length is 16 tokens"):
            step(lm, rows=[[104] * 12])
        lm.close()
    finally:
        s.close()
