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

**Replicas.** Several base URLs share the load: each request goes to the healthy replica
with the fewest requests in flight. A request that fails for a transport reason
(connection refused or reset, timeout, HTTP 5xx/429) marks its replica down for
``cooldown`` seconds and is retried on another, up to ``max_retries`` times; a replica
that dies mid-run therefore loses no results. Other HTTP errors (4xx) are not retried;
the server's message is in the exception.

**Log-probabilities.** The sampled tokens' log-probabilities are log q_τ when the server
runs with ``--logprobs-mode processed_logprobs`` (vLLM); at τ = 1 they are also log p.
At τ ≠ 1, log p comes from an ``echo`` scoring request of context + step (an extra
prefill), skipped with ``exact_log_p=False`` (log p = NaN; fine for
``StepModel(target="tempered")``). A server that returns untempered (raw) log-probabilities
at τ ≠ 1 is detected (they equal the scores) and refused with the flag to restart it with.

**Ledger** (``EngineLanguageModel``), recorded in the calling thread once the worker
threads have answered: a step records its sampled ``tokens``, the prompt tokens sent as
``prefill_tokens`` and the length of its longest row as ``forward_passes`` (the engine
steps of one batch, if the server runs the requests together); a scoring call records
its rows as ``prefill_tokens`` and one forward pass. ``client.retries`` counts the
retried requests.

**Tokenizer.** ``tokenizer``: a tokenizer object, or a path / hub id for
``transformers.AutoTokenizer``; by default the served model name is tried as a local
path, then the server's own ``/tokenize`` and ``/detokenize`` endpoints (vLLM) are used.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import numpy as np
import torch

from ppl_scaling.ledger import record

from .lm import EngineLanguageModel, StepReply

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
TRANSPORT_ERRORS = (OSError, http.client.HTTPException, socket.timeout)


class ServerError(RuntimeError):
    """A request the server(s) could not answer; the message holds the server's reply."""


class _Replica:
    """One server: its URL, health and in-flight count."""

    def __init__(self, url: str) -> None:
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url {url!r} is not an http(s) URL like 'http://127.0.0.1:8000/v1'")
        self.url = url.rstrip("/")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port or (443 if self.https else 80)
        path = parts.path.rstrip("/")
        self.root = path[:-3] if path.endswith("/v1") else path  # /tokenize lives beside /v1
        self.api = self.root + "/v1"
        self.in_flight = 0
        self.served = 0
        self.down_until = 0.0
        self.last_error = ""

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)


class _Client:
    """JSON over HTTP to a set of replicas, with bounded retries (module docstring)."""

    def __init__(self, urls: Sequence[str], api_key: str | None, timeout: float, max_retries: int,
                 max_concurrency: int, cooldown: float) -> None:
        if not urls:
            raise ValueError("pass at least one base_url")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.replicas = [_Replica(u) for u in urls]
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout, self.max_retries, self.cooldown = timeout, max_retries, cooldown
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="openai-lm")
        self.lock = threading.Lock()
        self.local = threading.local()
        self.retries = 0

    def once(self, replica: _Replica, method: str, path: str, body: Any = None,
             timeout: float | None = None) -> tuple[int, Any]:
        """One request to one replica (a fresh connection per thread and replica, kept alive)."""
        conns = self.local.__dict__.setdefault("conns", {})
        conn = conns.get(id(replica))
        if conn is None or timeout is not None:
            conn = replica.connect(timeout or self.timeout)
            if timeout is None:
                conns[id(replica)] = conn
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=self.headers)
            resp = conn.getresponse()
            raw = resp.read()
        except BaseException:
            conn.close()
            conns.pop(id(replica), None)
            raise
        try:
            return resp.status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return resp.status, raw.decode("utf-8", "replace")

    def _pick(self, exclude: set[int]) -> _Replica:
        with self.lock:
            now = time.monotonic()
            live = [r for r in self.replicas if r.down_until <= now and id(r) not in exclude]
            pool = live or [r for r in self.replicas if id(r) not in exclude] or self.replicas
            r = min(pool, key=lambda r: (r.down_until > now, r.in_flight))
            r.in_flight += 1
            return r

    def post(self, path: str, body: dict[str, Any], *, under_v1: bool = True) -> Any:
        """POST ``path`` (under ``/v1`` unless ``under_v1=False``) to the least busy healthy
        replica; transport errors and 5xx/429 are retried on another replica
        (``max_retries`` times), other errors raise ``ServerError``."""
        errors: list[str] = []
        tried: set[int] = set()
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(0.2 * 2 ** (attempt - 1), 2.0))
            replica = self._pick(tried if len(tried) < len(self.replicas) else set())
            try:
                status, data = self.once(replica, "POST", (replica.api if under_v1 else replica.root) + path, body)
            except TRANSPORT_ERRORS as e:
                status, data = None, f"{type(e).__name__}: {e}"
            finally:
                with self.lock:
                    replica.in_flight -= 1
            if status == 200:
                with self.lock:
                    replica.served += 1
                return data
            message = _error_text(data)
            errors.append(f"{replica.url}: {status or 'no response'} {message}")
            if status is not None and status not in RETRY_STATUS:
                raise ServerError(f"{replica.url}{path} rejected the request (HTTP {status}): {message}")
            with self.lock:
                replica.down_until = time.monotonic() + self.cooldown
                replica.last_error = message
                self.retries += 1
            tried.add(id(replica))
        raise ServerError(f"{path} failed after {self.max_retries + 1} attempts on "
                          f"{len(self.replicas)} replica(s):\n  " + "\n  ".join(errors))

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return list(self.pool.map(fn, items))


def _error_text(data: Any) -> str:
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(err)
    return str(data)[:500]


class _ServerTokenizer:
    """The server's ``/tokenize`` and ``/detokenize`` endpoints (vLLM) as a tokenizer."""

    def __init__(self, client: _Client, model: str) -> None:
        self.client, self.model = client, model
        self.eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(self.client.post("/tokenize", {"model": self.model, "prompt": text}, under_v1=False)["tokens"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.client.post("/detokenize", {"model": self.model, "tokens": list(ids)},
                                under_v1=False)["prompt"]


class OpenAICompatibleLanguageModel(EngineLanguageModel):
    """Completions servers as a ``LanguageModel`` (module docstring).

    ``base_url``: one URL or several (replicas serving the same model), e.g.
    ``"http://127.0.0.1:8000/v1"`` (the ``/v1`` is optional). ``model``: the served model
    name (checked against ``/v1/models``). ``timeout``: seconds per request;
    ``max_retries``: extra attempts per request; ``cooldown``: seconds a failing replica
    is skipped. ``logprobs=False`` asks for no log-probabilities (about half the cost of a
    request on a vLLM server; ``log_q`` and ``log_p`` are then NaN, which only
    ``StepModel(target="model")`` would read).
    """

    def __init__(self, base_url: str | Sequence[str], model: str, api_key: str | None = None, *,
                 tokenizer: Any = None, max_concurrency: int = 64, timeout: float = 120.0, max_retries: int = 3,
                 cooldown: float = 30.0, logprobs: bool = True, exact_log_p: bool = True,
                 eos_token_id: int | Sequence[int] | None = None) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.client = _Client(urls, api_key, timeout, max_retries, max_concurrency, cooldown)
        self.model, self.logprobs, self.exact_log_p = model, logprobs, exact_log_p
        self._check_servers()
        self.tokenizer = self._tokenizer(tokenizer)
        eos = eos_token_id if eos_token_id is not None else getattr(self.tokenizer, "eos_token_id", None)
        self.eos_token_id = eos

    def _check_servers(self) -> None:
        for r in self.client.replicas:
            try:
                status, data = self.client.once(r, "GET", r.api + "/models", timeout=min(self.client.timeout, 10.0))
            except TRANSPORT_ERRORS as e:
                raise ConnectionError(f"cannot reach the OpenAI-compatible server at {r.url} ({type(e).__name__}: "
                                      f"{e}); is it running and listening there? (vLLM: `vllm serve MODEL "
                                      f"--port PORT`)") from e
            if status != 200:
                raise ServerError(f"{r.url}/v1/models answered HTTP {status}: {_error_text(data)} "
                                  "(wrong api_key or not an OpenAI-compatible server?)")
            served = [m.get("id") for m in (data or {}).get("data", [])]
            if self.model not in served:
                raise ValueError(f"the server at {r.url} does not serve model {self.model!r}; it serves {served}. "
                                 "Pass one of those names as model=")

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
        self.client.pool.shutdown(wait=True)

    def decode_rows(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """Decode the rows, concurrently when the server's ``/detokenize`` does it."""
        if isinstance(self.tokenizer, _ServerTokenizer):
            return self.client.map(self.decode, rows)
        return [self.decode(r) for r in rows]

    # -- requests ----------------------------------------------------------------------
    def _complete(self, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.client.map(lambda b: self.client.post("/completions", {"model": self.model, **b}), bodies)

    def token_logprobs(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """For each row, log p(row[i] | row[:i]) for i = 1 .. len(row)-1 (an ``echo`` request)."""
        bodies = [{"prompt": list(r), "max_tokens": 1, "temperature": 1.0, "echo": True, "logprobs": 0}
                  for r in rows]
        out = []
        for r, resp in zip(rows, self._complete(bodies)):
            lps = resp["choices"][0]["logprobs"]["token_logprobs"][1:len(r)]
            out.append(np.array(lps, dtype=np.float64))
        if rows:  # recorded here, in the calling thread, once the workers have answered
            record(prefill_tokens=sum(len(r) for r in rows), forward_passes=1)
        return out

    def next_token_logprobs(self, contexts: list[list[int]]) -> torch.Tensor:
        raise NotImplementedError("OpenAI-compatible servers return at most a few top log-probabilities per "
                                  "token, not the whole next-token distribution; score given continuations "
                                  "with token_logprobs(rows) instead")

    def request_steps(self, rows: Sequence[Sequence[int]], *, stop: str | None, max_tokens: int,
                      temperature: float, seeds: Sequence[int]) -> list[StepReply]:
        """One concurrent ``/completions`` request per row (module docstring)."""
        eos_ids = self.eos_token_ids
        common: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature,
                                  "include_stop_str_in_output": True, "return_token_ids": True,
                                  "skip_special_tokens": True}
        if self.logprobs:
            common.update(logprobs=0, return_tokens_as_token_ids=True)
        if stop is not None:
            common["stop"] = [stop]
        if eos_ids:
            common["stop_token_ids"] = sorted(eos_ids)
        replies = []
        for resp in self._complete([{"prompt": list(ids), "seed": s, **common} for ids, s in zip(rows, seeds)]):
            choice = resp["choices"][0]
            ids, lps = self._tokens(choice)
            finished = choice.get("finish_reason") == "stop"
            delimited = finished and stop is not None and isinstance(choice.get("stop_reason"), str)
            replies.append(StepReply(ids, lps if self.logprobs else None, finished and not delimited, delimited))
        return replies

    def _tokens(self, choice: dict[str, Any]) -> tuple[list[int], np.ndarray]:
        """The new token ids and (with ``logprobs``) their log-probabilities."""
        if self.logprobs:
            lp = choice.get("logprobs") or {}
            tokens = lp.get("tokens") or []
            if all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
                return [int(t[9:]) for t in tokens], np.array(lp.get("token_logprobs") or [], dtype=np.float64)
        elif choice.get("token_ids") is not None:
            return list(choice["token_ids"]), np.zeros(0)
        raise ServerError("the server returned no token ids (vLLM's return_token_ids / "
                          "return_tokens_as_token_ids); this backend needs a vLLM-compatible completions endpoint")

    def check_proposal_logprobs(self, sampled: np.ndarray, scored: np.ndarray, temperature: float) -> None:
        """Refuse a server that returns the model's own (raw) log-probabilities at τ != 1."""
        if sampled.size >= 4 and np.allclose(sampled, scored, atol=1e-4):
            raise ServerError(f"at temperature {temperature} the server returned the model's own (raw) "
                              "log-probabilities for sampled tokens, not the proposal's; restart vLLM with "
                              "--logprobs-mode processed_logprobs (or use temperature=1)")
