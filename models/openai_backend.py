"""OpenAI-compatible completions servers (vLLM, SGLang, ...) as a ``LanguageModel``.

    lm = OpenAICompatibleLanguageModel(["http://node1:8000", "http://node2:8000"],
                                       "Qwen/Qwen2.5-Math-1.5B-Instruct", max_concurrency=128)
    fk = Tilted(StepModel(lm, prompt, step_delimiter="\\n\\n", temperature=0.8), prm)

One SMC step sends one ``POST /v1/completions`` per unfinished particle, concurrently
(a thread pool of ``max_concurrency`` workers; standard library only): the prompt as
token ids, ``stop`` = the step delimiter (kept in the output), ``max_tokens`` = the step
length, a per-particle ``seed`` drawn from the sampler's ``torch.Generator``, and
``logprobs`` for the sampled tokens. Token ids come back through vLLM's
``return_token_ids`` / ``return_tokens_as_token_ids`` extensions (a vLLM-compatible
server is needed).

**Strict replies.** Every reply is checked before it is used: valid JSON, exactly one
choice, ``finish_reason`` "stop" or "length", token ids present (and equal where given
twice), one log-probability per token (a number <= 0: not null, not NaN), at most
``max_tokens`` tokens, an
``echo`` that repeats the row sent. Anything else raises ``BadResponseError`` naming
the replica, the reason and the first 200 characters of the reply; a reply is never
turned into an empty step or a NaN. Malformed replies are not retried (a server that
sends one will send it again), except ``finish_reason: "abort"`` (a replica shutting
down), which is retried like a 5xx.

**Deadlines.** ``timeout`` bounds one attempt as a whole: connect, send and the reading
of every byte of the reply (each socket read gets the time left, so a server that
trickles bytes fails within ``timeout``, not ``timeout`` per read). Replies over 64 MiB
are refused. Host-name resolution is not covered (use IP addresses or a local resolver).

**Replicas and retries.** Several base URLs share the load: each request goes to the
healthy replica with the fewest requests in flight. A request that fails for a transport
reason (connection refused or reset, HTTP 5xx/429, a timeout) marks its replica down for
``cooldown`` seconds and is retried, on another replica when there is one, up to
``max_retries`` times; a replica that dies mid-run therefore loses no results. A replica
that timed out is not tried again within the same request (retrying it would double the
wait), so with a single replica a stalled server fails after about ``timeout`` seconds;
in general a request ends within ``min(max_retries + 1, replicas) * timeout`` plus the
waits below. Before a second attempt on the same replica the client waits an
exponential backoff (0.2 s, 0.4 s, ... capped at 5 s and ``max_wait``; the backoffs of
one request add up to at most ``timeout``) with jitter (x 0.5-1.0, from
``random.Random(jitter_seed)``: the jitter only decides *when* a retry is sent, never
what is sampled, since each request carries its own seed, so results stay
reproducible). A ``Retry-After`` header (seconds or an HTTP date) on 429 / 503 is
honoured: that replica is not asked again before then; a wait longer than ``max_wait``
fails at once with the server's request in the message. A stale keep-alive connection
(closed by the server while idle) is reopened once, transparently. Other HTTP errors
(4xx) are not retried; the server's message is in the exception. Retries and replica
health (down / back) are logged on the logger ``ppl_scaling.models.openai_backend``.

**Context length** (``lm.context_length``). The served model's context comes from
``/v1/models`` (vLLM reports ``max_model_len``; the smallest over the replicas) or from
``context_length=`` (which may not exceed the reported one). A request whose prompt +
``max_tokens`` exceeds it is refused before it is sent (``ContextLengthError`` of
``ppl_scaling.models.lm``, with the lengths), since vLLM would otherwise silently shorten
the step; ``truncate="left"`` sends the last tokens of the prompt that fit instead (a scoring
request then returns NaN for the positions cut off; the ledger's ``prefill_tokens`` of a
step still counts the whole context). When the server reports no context length and
none is given, nothing is checked here and the server's own error (HTTP 400, its
message) is raised as ``ServerError``.

**Sampling controls.** Every step request carries ``temperature``, ``top_p``, ``top_k``
(-1: off), ``min_p`` and neutral penalties (``SAMPLING_DEFAULTS``), so that the server's
generation-config defaults never change the proposal behind the client's back; semantics
and order as vLLM's sampler (``ppl_scaling.models.lm``: temperature, min-p, top-k, top-p).

**Log-probabilities.** The sampled tokens' log-probabilities are log q (the tempered,
truncated, renormalised proposal) when the server runs with ``--logprobs-mode
processed_logprobs`` (vLLM); at τ = 1 without truncation they are also log p. Otherwise
log p comes from an ``echo`` scoring request of context + step (an extra prefill), skipped
with ``exact_log_p=False`` (log p = NaN; fine for ``StepModel(target="tempered")``). A server
that returns untempered (raw) log-probabilities at τ ≠ 1 is detected (they equal the scores)
and refused with the flag to restart it with (at τ = 1 with truncation alone this check
cannot tell them apart and is skipped).

**Ledger** (``EngineLanguageModel``), recorded in the calling thread once the worker
threads have answered: a step records its sampled ``tokens``, the prompt tokens of the
contexts as ``prefill_tokens`` and the length of its longest row as ``forward_passes``
(the engine steps of one batch, if the server runs the requests together); a scoring
call records the tokens it sends as ``prefill_tokens`` and one forward pass.
``client.retries`` counts the failed attempts that were retried.

**Tokenizer.** ``tokenizer``: a tokenizer object, or a path / hub id for
``transformers.AutoTokenizer``; by default the served model name is tried as a local
path, then the server's own ``/tokenize`` and ``/detokenize`` endpoints (vLLM) are used.
"""
from __future__ import annotations

import email.utils
import http.client
import io
import json
import logging
import math
import os
import random
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import numpy as np
import torch

from ppl_scaling.ledger import record

from .lm import TRUNCATIONS, ContextLengthError, EngineLanguageModel, StepReply, fit_context

__all__ = ["OpenAICompatibleLanguageModel", "ServerError", "BadResponseError", "ContextLengthError"]

logger = logging.getLogger("ppl_scaling.models.openai_backend")

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
RETRY_AFTER_STATUS = frozenset({429, 503})
# socket.timeout is TimeoutError (an OSError) since Python 3.10
TRANSPORT_ERRORS = (OSError, http.client.HTTPException)
# a kept-alive connection the server closed while it was idle: reopened once, not counted as a failure
STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                           ConnectionAbortedError)
SNIPPET_CHARS = 200                # of a reply quoted in an error
MESSAGE_CHARS = 500                # of a server's error message quoted in an error
MAX_RESPONSE_BYTES = 64 << 20      # a larger reply is refused
BACKOFF_BASE, BACKOFF_CAP = 0.2, 5.0
MODELS_TIMEOUT = 10.0              # the /v1/models check at start-up (at most ``timeout``)
TOKEN_ID_PREFIX = "token_id:"      # vLLM's return_tokens_as_token_ids
LOGPROB_SLACK = 1e-3               # a log-probability above this is not one
# Sent with every step request: a server fills the fields a request leaves out from the model's
# generation_config.json (vLLM's default --generation-config auto), e.g. top_k=20 or a repetition
# penalty, which would silently change the proposal. top_k -1: off (vLLM, SGLang).
SAMPLING_DEFAULTS: dict[str, Any] = {"top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                                     "presence_penalty": 0.0, "frequency_penalty": 0.0}


class ServerError(RuntimeError):
    """A request the server(s) could not answer; the message holds the server's reply."""


class BadResponseError(ServerError):
    """A reply without the shape this backend needs (invalid JSON, missing or null
    log-probabilities or token ids, a wrong number of choices, ...); the message names
    the replica, the reason and the start of the reply."""


class _Malformed(Exception):
    """Raised by a reply parser; the client turns it into ``BadResponseError`` (or retries)."""

    def __init__(self, reason: str, *, retry: bool = False) -> None:
        super().__init__(reason)
        self.retry = retry


def _snippet(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return repr(text[:SNIPPET_CHARS]) + (f" ... ({len(text)} characters)" if len(text) > SNIPPET_CHARS else "")


# --------------------------------------------------------------------------- transport


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes, each read given only the time left before ``deadline``. ``holder``:
    the socket's ``makefile()``, closed with the reader; it keeps the socket open after
    http.client closes a connection whose reply reads until the server closes it."""

    def __init__(self, sock: Any, holder: Any, deadline: float) -> None:
        self.sock, self.holder, self.deadline = sock, holder, deadline

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.holder.close()
        super().close()

    def readinto(self, buf: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out reading the response (request deadline passed)")
        self.sock.settimeout(left)
        return self.sock.recv_into(buf)


class _DeadlineResponse(http.client.HTTPResponse):
    """An ``HTTPResponse`` that reads through a ``_DeadlineReader`` (status line, headers, body)."""

    def __init__(self, sock: Any, *args: Any, deadline: float, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp = io.BufferedReader(_DeadlineReader(sock, self.fp, deadline))


@dataclass
class _Reply:
    status: int
    raw: bytes
    headers: Any  # http.client.HTTPMessage


def _read_body(resp: http.client.HTTPResponse, where: str) -> bytes:
    length = resp.getheader("Content-Length")
    if length and length.strip().isdigit() and int(length) > MAX_RESPONSE_BYTES:
        raise BadResponseError(f"{where} announced a reply of {int(length)} bytes, more than the "
                               f"{MAX_RESPONSE_BYTES} accepted")
    chunks, total = [], 0
    while True:
        chunk = resp.read(1 << 16)
        if not chunk:
            break
        total += len(chunk)
        if total > MAX_RESPONSE_BYTES:
            raise BadResponseError(f"{where} sent a reply of more than {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    if resp.length:  # http.client returns a short body silently when the server closes early
        raise http.client.IncompleteRead(b"".join(chunks), resp.length)
    return b"".join(chunks)


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


class _Replica:
    """One server: its URL, headers, health and in-flight count."""

    def __init__(self, url: Any, api_key: str | None, env_key: str | None) -> None:
        if not isinstance(url, str) or not url.strip():
            raise ValueError(f"each base_url must be a non-empty string like 'http://127.0.0.1:8000/v1', got {url!r}")
        url = url.strip()
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError as e:
            raise ValueError(f"base_url {url!r} has an invalid port ({e})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url {url!r} is not an http(s) URL like 'http://127.0.0.1:8000/v1' "
                             "(the scheme http:// or https:// is required)")
        self.url = url.rstrip("/")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, port or (443 if self.https else 80)
        path = parts.path.rstrip("/")
        self.root = path[:-3] if path.endswith("/v1") else path  # /tokenize lives beside /v1
        self.api = self.root + "/v1"
        # the key: an explicit api_key always; OPENAI_API_KEY only over https
        key = api_key if api_key is not None else (env_key if self.https else None)
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.sends_key = bool(key)
        self.in_flight = 0
        self.served = 0
        self.down_until = 0.0   # our cooldown: a routing preference
        self.retry_at = 0.0     # the server's Retry-After: not asked again before then
        self.last_error = ""

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)


def _check_number(name: str, value: Any, *, low: float, strict: bool, integer: bool = False) -> None:
    kind = Integral if integer else Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value) and \
        (value > low if strict else value >= low)
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {what} {'>' if strict else '>='} {low:g}, got {value!r}")


class _Client:
    """JSON over HTTP to a set of replicas, with deadlines and bounded retries (module docstring)."""

    def __init__(self, urls: Sequence[str], api_key: str | None, timeout: float, max_retries: int,
                 max_concurrency: int, cooldown: float, max_wait: float = 30.0,
                 jitter_seed: int | None = None) -> None:
        if isinstance(urls, (str, bytes)) or not urls:
            raise ValueError("pass at least one base_url (e.g. 'http://127.0.0.1:8000/v1')")
        _check_number("timeout", timeout, low=0, strict=True)
        _check_number("max_retries", max_retries, low=0, strict=False, integer=True)
        _check_number("max_concurrency", max_concurrency, low=1, strict=False, integer=True)
        _check_number("cooldown", cooldown, low=0, strict=False)
        _check_number("max_wait", max_wait, low=0, strict=False)
        if api_key is not None and not isinstance(api_key, str):
            raise ValueError(f"api_key must be a string or None, got {type(api_key).__name__}")
        env_key = os.environ.get("OPENAI_API_KEY") or None
        self.replicas = [_Replica(u, api_key, env_key) for u in urls]
        seen: set[str] = set()
        for r in self.replicas:
            if r.url in seen:
                raise ValueError(f"base_url {r.url!r} is listed twice")
            seen.add(r.url)
            if api_key and not r.https:
                logger.info("sending the api_key passed over plain http to %s", r.url)
        self.timeout, self.max_retries, self.cooldown = float(timeout), int(max_retries), float(cooldown)
        self.max_wait = float(max_wait)
        self.jitter = random.Random(jitter_seed)  # retry timing only (module docstring)
        self.pool = ThreadPoolExecutor(int(max_concurrency), thread_name_prefix="openai-lm")
        self.lock = threading.Lock()
        self.local = threading.local()
        self.conns: weakref.WeakSet = weakref.WeakSet()
        self.retries = 0

    # -- one attempt ------------------------------------------------------------------
    def once(self, replica: _Replica, method: str, path: str, body: Any = None,
             timeout: float | None = None) -> _Reply:
        """One request to one replica within ``timeout`` seconds in all (connect, send,
        read); a connection per thread and replica, kept alive."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        payload = None if body is None else json.dumps(body).encode()
        conns = self.local.__dict__.setdefault("conns", {})
        for _ in range(2):
            conn = conns.get(replica.url)
            if conn is None:
                conn = conns[replica.url] = replica.connect(self.timeout)
                self.conns.add(conn)
            reused = conn.sock is not None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out before the request was sent (request deadline passed)")
            conn.timeout = left  # connect (when the connection is opened now) and send
            if conn.sock is not None:
                conn.sock.settimeout(left)
            conn.response_class = partial(_DeadlineResponse, deadline=deadline)
            try:
                conn.request(method, path, body=payload, headers=replica.headers)
                resp = conn.getresponse()
                return _Reply(resp.status, _read_body(resp, f"{replica.url} ({path})"), resp.headers)
            except STALE_CONNECTION_ERRORS as e:
                self._drop(conns, replica, conn)
                if not reused:
                    raise
                logger.debug("%s: kept-alive connection closed by the server (%s); reconnecting", replica.url, e)
            except BaseException:
                self._drop(conns, replica, conn)
                raise
        raise AssertionError("unreachable")

    @staticmethod
    def _drop(conns: dict, replica: _Replica, conn: http.client.HTTPConnection) -> None:
        conn.close()
        if conns.get(replica.url) is conn:
            del conns[replica.url]

    def decode(self, replica: _Replica, path: str, reply: _Reply) -> Any:
        """The JSON of a 200 reply; ``BadResponseError`` when it is not JSON."""
        try:
            return json.loads(reply.raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadResponseError(f"{replica.url} ({path}) answered HTTP {reply.status} with invalid JSON "
                                   f"({e}); reply: {_snippet(reply.raw)}") from None

    # -- retries ----------------------------------------------------------------------
    def _pick(self, tried: set[int], timed_out: set[int], attempt: int,
              backoff_left: float) -> tuple[_Replica | None, float]:
        """The replica for the next attempt (counted in flight) and the seconds to wait first:
        untried before tried, healthy before down, least busy first; never a replica that
        timed out in this request, nor one before its Retry-After. ``backoff_left``: what the
        request's backoff waits may still add up to."""
        with self.lock:
            now = time.monotonic()
            pool = [r for r in self.replicas if id(r) not in timed_out]
            if not pool:
                return None, 0.0
            r = min(pool, key=lambda r: (max(r.retry_at - now, 0.0), id(r) in tried, r.down_until > now,
                                         r.in_flight))
            wait = max(r.retry_at - now, 0.0)
            if id(r) in tried:  # the same server again: back off (capped, jittered)
                backoff = min(BACKOFF_BASE * 2 ** (attempt - 1), BACKOFF_CAP, self.max_wait)
                wait = max(wait, min(backoff * (0.5 + 0.5 * self.jitter.random()), backoff_left))
            r.in_flight += 1
            return r, wait

    def post(self, path: str, body: dict[str, Any], *, under_v1: bool = True,
             parse: Callable[[Any], Any] | None = None) -> Any:
        """POST ``path`` (under ``/v1`` unless ``under_v1=False``) to the least busy healthy
        replica and return ``parse(json)`` (the JSON itself without ``parse``); transport
        errors, timeouts and 5xx/429 are retried (``max_retries`` times; module docstring),
        other HTTP errors raise ``ServerError``, malformed replies ``BadResponseError``."""
        errors: list[str] = []
        tried: set[int] = set()
        timed_out: set[int] = set()
        attempts = self.max_retries + 1
        backoff_left = self.timeout  # the backoff waits of one request add up to at most ``timeout``
        for attempt in range(attempts):
            replica, wait = self._pick(tried, timed_out, attempt, backoff_left)
            if replica is None:
                break
            where = f"{replica.url} ({path})"
            retry_after: float | None = None
            try:
                if wait > self.max_wait:
                    raise ServerError(f"{where} asked to wait {wait:.1f} s before retrying (Retry-After), more "
                                      f"than max_wait={self.max_wait:g} s" +
                                      "".join(f"\n  {e}" for e in errors or [f"{replica.url}: {replica.last_error}"]))
                if wait > 0:
                    time.sleep(wait)
                    backoff_left = max(0.0, backoff_left - wait)
                reply = self.once(replica, "POST", (replica.api if under_v1 else replica.root) + path, body)
                error = None
            except TRANSPORT_ERRORS as e:
                reply, error = None, f"{type(e).__name__}: {str(e) or 'no detail'}"
                if isinstance(e, TimeoutError):
                    timed_out.add(id(replica))
                    error += f" (timeout={self.timeout:g} s)"
            finally:
                with self.lock:
                    replica.in_flight -= 1
            if reply is not None and reply.status == 200:
                data = self.decode(replica, path, reply)
                try:
                    result = data if parse is None else parse(data)
                except _Malformed as m:
                    if not m.retry:
                        raise BadResponseError(f"{where}: {m}; reply: {_snippet(reply.raw)}") from None
                    error = f"{m}; reply: {_snippet(reply.raw)}"
                else:
                    self._served(replica)
                    return result
            elif reply is not None:
                message = _error_text(reply.raw)
                if reply.status not in RETRY_STATUS:
                    raise ServerError(f"{where} rejected the request (HTTP {reply.status}): {message}")
                error = f"HTTP {reply.status}: {message}"
                if reply.status in RETRY_AFTER_STATUS:
                    retry_after = _retry_after(reply.headers.get("Retry-After"))
                    if retry_after is not None:
                        error += f" (Retry-After: {retry_after:.1f} s)"
            errors.append(f"{replica.url}: {error}")
            tried.add(id(replica))
            self._failed(replica, error, retry_after, retried=attempt + 1 < attempts, path=path,
                         attempt=attempt + 1, attempts=attempts)
        why = ("; every replica timed out (one that times out is not retried within the same request)"
               if len(timed_out) == len(self.replicas) and len(errors) < attempts else "")
        raise ServerError(f"{path} failed after {len(errors)} attempt(s) on {len(self.replicas)} replica(s) "
                          f"(max_retries={self.max_retries}){why}:\n  " + "\n  ".join(errors))

    def _served(self, replica: _Replica) -> None:
        with self.lock:
            replica.served += 1
            if replica.last_error:
                logger.info("replica %s is answering again", replica.url)
                replica.last_error = ""
                replica.down_until = 0.0

    def _failed(self, replica: _Replica, error: str, retry_after: float | None, *, retried: bool, path: str,
                attempt: int, attempts: int) -> None:
        with self.lock:
            now = time.monotonic()
            if replica.down_until <= now:
                logger.warning("replica %s marked down for %.0f s: %s", replica.url,
                               max(self.cooldown, retry_after or 0.0), error)
            replica.down_until = now + max(self.cooldown, retry_after or 0.0)
            if retry_after is not None:
                replica.retry_at = max(replica.retry_at, now + retry_after)
            replica.last_error = error
            if retried:
                self.retries += 1
        if retried:
            logger.info("%s%s attempt %d/%d failed (%s); retrying", replica.url, path, attempt, attempts, error)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return list(self.pool.map(fn, items))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for conn in list(self.conns):
            conn.close()


def _error_text(raw: bytes) -> str:
    """The server's error message in a reply body (OpenAI's {"error": {"message": ...}} or text)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _snippet(raw) if raw else "(empty reply)"
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message", data)))
        if isinstance(err, dict):
            err = err.get("message", err)
        text = str(err)
    else:
        text = str(data)
    return text[:MESSAGE_CHARS] + (" ..." if len(text) > MESSAGE_CHARS else "")


# --------------------------------------------------------------------------- reply parsing


def _one_choice(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _Malformed(f"expected a JSON object, got {type(data).__name__}")
    choices = data.get("choices")
    if not isinstance(choices, list):
        raise _Malformed("no 'choices' list in the reply")
    if len(choices) != 1:
        raise _Malformed(f"expected exactly 1 choice, got {len(choices)}")
    if not isinstance(choices[0], dict):
        raise _Malformed(f"the choice is a {type(choices[0]).__name__}, not an object")
    return choices[0]


def _int_list(values: Any, what: str) -> list[int]:
    if not isinstance(values, list):
        raise _Malformed(f"'{what}' is {'null' if values is None else 'missing' if values is ... else 'not a list'}"
                         " (vLLM's return_token_ids is needed)")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise _Malformed(f"'{what}' holds something other than token ids (non-negative integers)")
    return list(values)


def _logprobs_block(choice: dict[str, Any]) -> dict[str, Any]:
    lp = choice.get("logprobs", ...)
    if not isinstance(lp, dict):
        raise _Malformed(f"'logprobs' is {'missing' if lp is ... else 'null' if lp is None else 'not an object'} "
                         "although log-probabilities were asked for")
    return lp


def _tokens_as_ids(lp: dict[str, Any]) -> list[int]:
    tokens = lp.get("tokens", ...)
    if not isinstance(tokens, list):
        raise _Malformed(f"'logprobs.tokens' is {'missing' if tokens is ... else 'null' if tokens is None else 'not a list'}")
    ids = []
    for t in tokens:
        if not (isinstance(t, str) and t.startswith(TOKEN_ID_PREFIX) and t[len(TOKEN_ID_PREFIX):].isdigit()):
            raise _Malformed(f"'logprobs.tokens' holds {t!r}, not a token id 'token_id:N' (vLLM's "
                             "return_tokens_as_token_ids is needed)")
        ids.append(int(t[len(TOKEN_ID_PREFIX):]))
    return ids


def _logprob_values(values: Any, n: int, first_may_be_null: bool = False) -> np.ndarray:
    """The ``n`` entries of ``logprobs.token_logprobs`` as floats (finite or -inf, <= 0)."""
    if not isinstance(values, list):
        raise _Malformed(f"'logprobs.token_logprobs' is {'null' if values is None else 'missing' if values is ... else 'not a list'}")
    if len(values) != n:
        raise _Malformed(f"{len(values)} log-probabilities for {n} tokens")
    out = np.empty(n)
    for i, v in enumerate(values):
        if v is None and i == 0 and first_may_be_null:
            out[i] = np.nan
            continue
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Malformed(f"log-probability {i} is {'null' if v is None else repr(v)}, not a number")
        if math.isnan(v) or v > LOGPROB_SLACK:
            raise _Malformed(f"log-probability {i} is {v!r}, not a log-probability (<= 0)")
        out[i] = min(float(v), 0.0)
    return out


# --------------------------------------------------------------------------- the model


class _ServerTokenizer:
    """The server's ``/tokenize`` and ``/detokenize`` endpoints (vLLM) as a tokenizer."""

    def __init__(self, client: _Client, model: str) -> None:
        self.client, self.model = client, model
        self.eos_token_id = None

    def encode(self, text: str) -> list[int]:
        def parse(data: Any) -> list[int]:
            if not isinstance(data, dict):
                raise _Malformed(f"expected a JSON object, got {type(data).__name__}")
            return _int_list(data.get("tokens", ...), "tokens")

        return self.client.post("/tokenize", {"model": self.model, "prompt": text}, under_v1=False, parse=parse)

    def decode(self, ids: Sequence[int]) -> str:
        def parse(data: Any) -> str:
            if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
                raise _Malformed("no 'prompt' string in the /detokenize reply")
            return data["prompt"]

        return self.client.post("/detokenize", {"model": self.model, "tokens": list(ids)}, under_v1=False,
                                parse=parse)


class OpenAICompatibleLanguageModel(EngineLanguageModel):
    """Completions servers as a ``LanguageModel`` (module docstring).

    ``base_url``: one URL or several (replicas serving the same model), e.g.
    ``"http://127.0.0.1:8000/v1"`` (the scheme is required, the ``/v1`` optional).
    ``model``: the served model name (checked against ``/v1/models``).

    ``api_key``: sent as ``Authorization: Bearer`` to every replica when passed
    explicitly (plain http included: you asked for it); ``api_key=""`` sends none. When
    it is None (the default) the ``OPENAI_API_KEY`` environment variable is used for
    **https** replicas only; it is never sent to a plain-http URL unless passed.

    ``timeout``: seconds one attempt may take in all (connect, send, read every byte);
    ``max_retries`` (>= 0): extra attempts per request; ``cooldown``: seconds a failing
    replica is avoided; ``max_wait``: the longest wait before a retry (a server's
    ``Retry-After`` beyond it fails at once); ``jitter_seed``: seeds the backoff jitter
    (timing only). ``max_concurrency`` (>= 1): requests in flight at once.

    ``context_length``: the model's context in tokens (default: vLLM's ``max_model_len``
    from ``/v1/models``; it may only lower that); ``truncate``: None refuses an over-long
    request with ``ContextLengthError``, ``"left"`` drops the prompt's first tokens.

    ``logprobs=False`` asks for no log-probabilities (about half the cost of a request
    on a vLLM server; ``log_q`` and ``log_p`` are then NaN, which only
    ``StepModel(target="model")`` would read).

    Errors: ``ConnectionError`` (no server at a URL, at construction), ``ValueError``
    (bad arguments, unknown model), ``ContextLengthError``, ``ServerError`` (HTTP errors,
    retries exhausted, timeouts) and its subclass ``BadResponseError`` (malformed replies).
    """

    def __init__(self, base_url: str | Sequence[str], model: str, api_key: str | None = None, *,
                 tokenizer: Any = None, max_concurrency: int = 64, timeout: float = 120.0, max_retries: int = 3,
                 cooldown: float = 30.0, max_wait: float = 30.0, jitter_seed: int | None = None,
                 context_length: int | None = None, truncate: str | None = None, logprobs: bool = True,
                 exact_log_p: bool = True, eos_token_id: int | Sequence[int] | None = None) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be the served model's name (a non-empty string), got {model!r}")
        if context_length is not None:
            _check_number("context_length", context_length, low=2, strict=False, integer=True)
        if truncate not in TRUNCATIONS:
            raise ValueError(f"truncate must be one of {TRUNCATIONS} (None: refuse over-long prompts), "
                             f"got {truncate!r}")
        urls = list(base_url) if isinstance(base_url, (list, tuple)) else [base_url]
        self.client = _Client(urls, api_key, timeout, max_retries, max_concurrency, cooldown, max_wait, jitter_seed)
        self.model, self.logprobs, self.exact_log_p, self.truncate = model, logprobs, exact_log_p, truncate
        self.context_length: int | None = None
        self.context_source = ""
        try:
            reported = self._check_servers()
            self._set_context(reported, context_length)
            self.tokenizer = self._tokenizer(tokenizer)
        except BaseException:
            self.client.close()
            raise
        eos = eos_token_id if eos_token_id is not None else getattr(self.tokenizer, "eos_token_id", None)
        self.eos_token_id = eos

    def _check_servers(self) -> dict[str, int]:
        """Check that every replica serves ``model``; returns the ``max_model_len`` each reports."""
        reported: dict[str, int] = {}
        for r in self.client.replicas:
            try:
                reply = self.client.once(r, "GET", r.api + "/models", timeout=min(self.client.timeout, MODELS_TIMEOUT))
            except TRANSPORT_ERRORS as e:
                raise ConnectionError(f"cannot reach the OpenAI-compatible server at {r.url} ({type(e).__name__}: "
                                      f"{e}); is it running and listening there? (vLLM: `vllm serve MODEL "
                                      f"--port PORT`)") from e
            if reply.status != 200:
                raise ServerError(f"{r.url}/v1/models answered HTTP {reply.status}: {_error_text(reply.raw)} "
                                  "(wrong api_key or not an OpenAI-compatible server?)")
            data = self.client.decode(r, "/v1/models", reply)
            cards = data.get("data") if isinstance(data, dict) else None
            if not isinstance(cards, list) or not all(isinstance(c, dict) for c in cards):
                raise BadResponseError(f"{r.url}/v1/models: no list of models ('data') in the reply; "
                                       f"reply: {_snippet(reply.raw)}")
            served = [c.get("id") for c in cards]
            if self.model not in served:
                raise ValueError(f"the server at {r.url} does not serve model {self.model!r}; it serves {served}. "
                                 "Pass one of those names as model=")
            card = cards[served.index(self.model)]
            n = card.get("max_model_len")
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                reported[r.url] = n
        return reported

    def _set_context(self, reported: dict[str, int], context_length: int | None) -> None:
        if len(set(reported.values())) > 1:
            logger.warning("the replicas report different context lengths %s; using the smallest", reported)
        url = min(reported, key=reported.get) if reported else None
        if context_length is not None:
            if url is not None and context_length > reported[url]:
                raise ValueError(f"context_length={context_length} exceeds the context the server at {url} reports "
                                 f"(max_model_len={reported[url]})")
            self.context_length, self.context_source = int(context_length), f"context_length={context_length}"
        elif url is not None:
            self.context_length, self.context_source = reported[url], f"max_model_len reported by {url}"
        else:
            logger.info("the server reports no context length (max_model_len) and no context_length was given; "
                        "over-long requests are left to the server to refuse")

    def _tokenizer(self, tokenizer: Any) -> Any:
        if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
            return tokenizer
        source = tokenizer if tokenizer is not None else self.model
        if tokenizer is not None or Path(str(source)).expanduser().exists():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(Path(str(source)).expanduser()) if
                                                 Path(str(source)).expanduser().exists() else str(source))
        return _ServerTokenizer(self.client, self.model)

    # -- the minimal interface ---------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if isinstance(self.tokenizer, _ServerTokenizer):
            return self.tokenizer.encode(text)
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        if isinstance(self.tokenizer, _ServerTokenizer):
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def close(self) -> None:
        self.client.close()

    def decode_rows(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """Decode the rows, concurrently when the server's ``/detokenize`` does it."""
        if isinstance(self.tokenizer, _ServerTokenizer):
            return self.client.map(self.decode, rows)
        return [self.decode(r) for r in rows]

    # -- requests ----------------------------------------------------------------------
    def _fit(self, rows: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
        """The rows to send: each with ``len(row) + max_tokens`` within the context, or refused
        (``ContextLengthError``), or left-truncated (``truncate="left"``)."""
        who = f"OpenAICompatibleLanguageModel({self.model!r}; {self.context_source})"
        fitted, _ = fit_context(rows, max_tokens, self.context_length, truncate=self.truncate, who=who)
        return [list(r) for r in fitted]

    def _complete(self, requests: Sequence[tuple[dict[str, Any], Callable[[Any], Any]]]) -> list[Any]:
        return self.client.map(lambda req: self.client.post("/completions", {"model": self.model, **req[0]},
                                                            parse=req[1]), requests)

    def token_logprobs(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """For each row, log p(row[i] | row[:i]) for i = 1 .. len(row)-1 (an ``echo`` request;
        NaN for positions cut off by ``truncate="left"``)."""
        sent = self._fit(rows, 1)
        requests = [({"prompt": s, "max_tokens": 1, "temperature": 1.0, "echo": True, "logprobs": 0,
                      "return_tokens_as_token_ids": True}, partial(self._parse_echo, s)) for s in sent]
        out = [np.concatenate([np.full(len(r) - len(s), np.nan), lps])
               for r, s, lps in zip(rows, sent, self._complete(requests))]
        if rows:  # recorded here, in the calling thread, once the workers have answered
            record(prefill_tokens=sum(len(s) for s in sent), forward_passes=1)
        return out

    @staticmethod
    def _parse_echo(sent: list[int], data: Any) -> np.ndarray:
        """log p of ``sent[1:]`` from an echo reply (the echoed ids must be the row sent)."""
        lp = _logprobs_block(_one_choice(data))
        ids = _tokens_as_ids(lp)
        if ids[:len(sent)] != sent or len(ids) < len(sent):
            raise _Malformed(f"the echoed prompt ({len(ids)} tokens) is not the row sent ({len(sent)} tokens)")
        values = _logprob_values(lp.get("token_logprobs", ...), len(ids), first_may_be_null=True)
        return values[1:len(sent)]

    def next_token_logprobs(self, contexts: list[list[int]]) -> torch.Tensor:
        raise NotImplementedError("OpenAI-compatible servers return at most a few top log-probabilities per "
                                  "token, not the whole next-token distribution; score given continuations "
                                  "with token_logprobs(rows) instead")

    def request_steps(self, rows: Sequence[Sequence[int]], *, stop: str | None, max_tokens: int,
                      temperature: float, seeds: Sequence[int], top_p: float = 1.0, top_k: int | None = None,
                      min_p: float = 0.0) -> list[StepReply]:
        """One concurrent ``/completions`` request per row (module docstring)."""
        eos_ids = self.eos_token_ids
        common: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, **SAMPLING_DEFAULTS,
                                  "top_p": float(top_p), "top_k": int(top_k) if top_k else -1, "min_p": float(min_p),
                                  "include_stop_str_in_output": True, "return_token_ids": True,
                                  "skip_special_tokens": True}
        if self.logprobs:
            common.update(logprobs=0, return_tokens_as_token_ids=True)
        if stop is not None:
            common["stop"] = [stop]
        if eos_ids:
            common["stop_token_ids"] = sorted(eos_ids)
        parse = partial(self._parse_step, max_tokens=max_tokens, stop=stop)
        return self._complete([({"prompt": ids, "seed": s, **common}, parse)
                               for ids, s in zip(self._fit(rows, max_tokens), seeds)])

    def _parse_step(self, data: Any, *, max_tokens: int, stop: str | None) -> StepReply:
        """A step from a completions reply, checked (module docstring)."""
        choice = _one_choice(data)
        finish = choice.get("finish_reason")
        if finish == "abort":
            raise _Malformed("the server aborted the request (finish_reason 'abort')", retry=True)
        if finish not in ("stop", "length"):
            raise _Malformed(f"finish_reason is {finish!r}, not 'stop' or 'length'")
        lps = None
        if self.logprobs:
            lp = _logprobs_block(choice)
            ids = _tokens_as_ids(lp)
            lps = _logprob_values(lp.get("token_logprobs", ...), len(ids))
            if choice.get("token_ids") is not None and _int_list(choice["token_ids"], "token_ids") != ids:
                raise _Malformed("'token_ids' and 'logprobs.tokens' disagree")
        else:
            ids = _int_list(choice.get("token_ids", ...), "token_ids")
        if not ids:
            raise _Malformed("no tokens in the step")
        if len(ids) > max_tokens:
            raise _Malformed(f"{len(ids)} tokens for max_tokens={max_tokens}")
        finished = finish == "stop"
        delimited = finished and stop is not None and isinstance(choice.get("stop_reason"), str)
        return StepReply(ids, lps, finished and not delimited, delimited)

    def check_proposal_logprobs(self, sampled: np.ndarray, scored: np.ndarray, temperature: float) -> None:
        """Refuse a server that returns the model's own (raw) log-probabilities at τ != 1."""
        if sampled.size >= 4 and np.allclose(sampled, scored, atol=1e-4):
            raise ServerError(f"at temperature {temperature} the server returned the model's own (raw) "
                              "log-probabilities for sampled tokens, not the proposal's; restart vLLM with "
                              "--logprobs-mode processed_logprobs (or use temperature=1)")
