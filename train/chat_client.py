"""A small OpenAI-compatible chat client, standard library only (``urllib``).

The teacher of ``appliance distill`` and the LLM-judge metric both talk to a chat endpoint: a remote
service or a local ``llama_cpp.server``, anything that serves ``POST {base_url}/chat/completions``.
Every request passes a token-bucket rate limiter; 429, 5xx and connection errors are retried with
exponential backoff and jitter (a ``Retry-After`` header is honoured); other 4xx answers raise
``TeacherError`` at once with what to fix. The API key is read from a file and only ever sent in
the ``Authorization`` header: it never appears in a log line, an error or ``repr``.

The pure parts (``backoff_delay``, ``parse_retry_after``, ``TokenBucket`` on an injected clock) are
tested without a network; ``ChatClient`` is tested against real loopback servers.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import random
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx
MAX_RETRY_AFTER_S = 300.0


class TeacherError(RuntimeError):
    """The chat endpoint cannot answer; the message says what to fix. ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    finish_reason: str | None


@dataclass
class ClientStats:
    """What the client sent: HTTP attempts (retries included) and the tokens the server billed."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def read_api_key(path: str | Path) -> str:
    """The API key in ``path`` (first line, stripped). Warns when others may read the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TeacherError(
            f"API key file {path} does not exist; write the key into it on one line "
            "(chmod 600), or remove api_key_file for a server without authentication"
        ) from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise TeacherError(f"API key file {path} is empty; write the key into it on one line")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("API key file %s is readable by other users; chmod 600 it", path)
    return key


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds before retry number ``attempt`` (0 = first retry): ``base * 2**attempt`` capped at
    ``cap``, with "equal jitter" (between half and all of it) so clients do not retry in step."""
    full = min(cap, base * 2.0**attempt)
    return full * (0.5 + 0.5 * rng.random())


def parse_retry_after(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header (delta seconds or an HTTP date) as seconds from ``now`` (epoch)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class TokenBucket:
    """At most ``per_minute`` requests a minute on average, bursts of up to ``burst``.

    ``reserve(now)`` takes a token and returns how long to wait for it (pure, given the clock);
    ``acquire()`` reads ``clock`` and sleeps with ``sleep``, both injectable for tests.
    """

    def __init__(
        self,
        per_minute: float,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if per_minute <= 0 or burst < 1:
            raise ValueError(f"need per_minute > 0 and burst >= 1, got {per_minute}, {burst}")
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = burst
        self.clock, self.sleep = clock, sleep
        self._tokens = float(burst)
        self._last: float | None = None

    def reserve(self, now: float) -> float:
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= 1.0  # may go negative: the debt is the wait
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def acquire(self) -> float:
        wait = self.reserve(self.clock())
        if wait > 0:
            self.sleep(wait)
        return wait


def _error_detail(body: bytes) -> str:
    """The server's own words from an error body (OpenAI ``error.message``, FastAPI ``detail``)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body[:300].decode("utf-8", "replace").strip()
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
        if data.get("detail"):
            return str(data["detail"])[:300]
    return json.dumps(data)[:300]


def client_error_message(status: int, detail: str, url: str, model: str) -> str:
    """What a non-retryable 4xx means for the user, and what to change."""
    if status in (401, 403):
        fix = "the server refused the API key: check api_key_file (the key is never printed)"
    elif status == 404:
        fix = (
            f"no chat endpoint or no model {model!r} there: base_url must be the API root that "
            "ends in /v1 (for example http://127.0.0.1:8080/v1) and model a name the server lists "
            "at /v1/models"
        )
    elif status == 413:
        fix = "the request is too large: attach smaller images or ask shorter questions"
    else:
        fix = (
            "the server rejected the request: check model and max_tokens; a text-only teacher "
            "rejects image parts (set attach_image = false)"
        )
    return f"teacher {url} answered HTTP {status} ({detail}): {fix}"


class ChatClient:
    """``POST {base_url}/chat/completions`` with rate limiting, retries and token accounting."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        requests_per_minute: float | None = None,
        *,
        max_backoff: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.__api_key = api_key  # name-mangled and kept out of repr
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.limiter = (
            TokenBucket(requests_per_minute, sleep=sleep) if requests_per_minute else None
        )
        self.stats = ClientStats()

    def __repr__(self) -> str:
        key = "set" if self.__api_key else "none"
        return f"ChatClient(url={self.url!r}, model={self.model!r}, api_key={key})"

    def _request(self, payload: dict) -> urllib.request.Request:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        data = json.dumps(payload).encode("utf-8")
        return urllib.request.Request(self.url, data=data, headers=headers, method="POST")

    def _send_once(self, payload: dict) -> dict:
        """One HTTP attempt; raises ``_Retryable`` or ``TeacherError``."""
        if self.limiter is not None:
            self.limiter.acquire()
        self.stats.requests += 1
        try:
            with urllib.request.urlopen(self._request(payload), timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc.read())
            if exc.code in RETRYABLE_STATUS or exc.code >= 500:
                after = parse_retry_after(exc.headers.get("Retry-After"), time.time())
                raise _Retryable(f"HTTP {exc.code} ({detail})", after, exc.code) from None
            message = client_error_message(exc.code, detail, self.url, self.model)
            raise TeacherError(message, exc.code) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise _Retryable(f"connection failed ({reason})", None, None) from None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TeacherError(
                f"teacher {self.url} answered with something that is not JSON "
                f"({body[:120]!r}); is base_url an OpenAI-compatible API root?"
            ) from None

    def _post(self, payload: dict) -> dict:
        for attempt in range(self.max_retries + 1):
            try:
                return self._send_once(payload)
            except _Retryable as exc:
                if attempt == self.max_retries:
                    raise TeacherError(
                        f"teacher {self.url}: gave up after {attempt + 1} attempts, last: "
                        f"{exc.reason}. Check that the server is up, or raise max_retries / "
                        "lower requests_per_minute",
                        exc.status,
                    ) from None
                delay = backoff_delay(attempt, self.backoff, self.max_backoff, self.rng)
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                log.warning("teacher: %s; retry %d in %.1fs", exc.reason, attempt + 1, delay)
                self.stats.retries += 1
                self.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    def chat(
        self,
        messages: list[dict],
        *,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
    ) -> ChatResult:
        """One chat completion for ``messages`` (OpenAI format; contents may be part lists)."""
        payload: dict = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if seed is not None:
            payload["seed"] = seed
        return self._parse(self._post(payload))

    def _parse(self, data: dict) -> ChatResult:
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise TeacherError(
                f"teacher {self.url} answered without choices[0].message: {str(data)[:200]}"
            ) from None
        usage = data.get("usage") or {}
        prompt, completion = (
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
        )
        self.stats.prompt_tokens += prompt
        self.stats.completion_tokens += completion
        return ChatResult(
            text=str(text),
            prompt_tokens=prompt,
            completion_tokens=completion,
            model=str(data.get("model") or self.model),
            finish_reason=choice.get("finish_reason"),
        )


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None, status: int | None):
        super().__init__(reason)
        self.reason, self.retry_after, self.status = reason, retry_after, status
