"""LLM clients behind ``spae.icl.learners.LanguageModel``, and batched calls through Ray tasks.

- ``OpenAIClient``: any OpenAI-compatible HTTP server (OpenAI, vLLM, ``transformers serve``, ...),
  ``/completions`` or ``/chat/completions``. Base URL from ``llm.base_url`` or ``$OPENAI_BASE_URL``;
  the key only from the environment variable named by ``llm.api_key_env`` (``$OPENAI_API_KEY``):
  it is never a config value, never logged and never part of an error message.
- ``HFClient``: a local Hugging Face causal LM folder, in process.
- ``ReferenceLearner`` (``backend=reference``): TF-IDF nearest neighbour, no LLM.

Every HTTP request has a timeout; connection errors, timeouts, 408/409/429 and 5xx are retried with
exponential backoff (``Retry-After`` honoured), other HTTP errors fail at once. A request budget
(``max_requests``) bounds the number of prompts sent; ``complete_many`` spreads prompts over Ray
actors (``concurrency``) under a global rate limit (``requests_per_s``) and returns one result per
prompt: a ``Completion`` or a ``Failure`` (error, budget), never an exception for a single prompt.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from spae.icl.episodes import PromptTemplate
from spae.icl.learners import Completion, LanguageModel, ReferenceLearner

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class LLMConfig:
    backend: Literal["reference", "openai", "hf"] = "reference"
    model: str = ""  # the served model's name (openai) or a local model folder (hf)
    base_url: str = ""  # "" = $OPENAI_BASE_URL, else https://api.openai.com/v1
    api: Literal["completions", "chat"] = "completions"
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 1.0  # first retry waits backoff_s, then x2 each time (+ up to 25% jitter)
    backoff_max_s: float = 30.0
    max_requests: int = 0  # request budget: prompts sent at most (0 = unlimited)
    concurrency: int = 1  # > 1: prompts run on that many Ray actors
    cpus_per_worker: float = 0.25  # per Ray actor (hf: give it 1+ CPUs or a GPU)
    gpus_per_worker: float = 0.0
    requests_per_s: float = 0.0  # global rate limit (0 = none)
    context_window: int = 0  # 0 = the model's own (hf) or unknown (openai)
    count_tokenizer: str = ""  # openai: a local HF tokenizer folder to count prompt tokens with
    logprobs: bool = True  # ask for per-token log-probabilities
    send_stop: bool = True  # send stop sequences to the server (false: cut the text here only; for
    # servers whose tokenizer cannot express them, e.g. "\n" with a WordPiece vocabulary)
    device: str = "cpu"  # hf
    seed: int = 0  # hf sampling

    def __post_init__(self) -> None:
        if self.backend in ("openai", "hf") and not self.model:
            raise ValueError(f"llm.model is required for backend {self.backend!r}")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.concurrency < 1 or self.max_requests < 0:
            raise ValueError("llm: need max_retries >= 0, timeout_s > 0, concurrency >= 1, max_requests >= 0")


class LLMError(RuntimeError):
    """A request failed for good (after retries, or a non-retryable status)."""


class BudgetExhausted(LLMError):
    """The request budget (``llm.max_requests``) is spent."""


@dataclass(frozen=True)
class Failure:
    """One prompt that produced no completion: ``kind`` error | budget."""

    kind: str
    reason: str


class RequestBudget:
    """At most ``limit`` requests (0 = unlimited); thread-safe."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.limit and self.used >= self.limit:
                raise BudgetExhausted(f"request budget of {self.limit} requests is spent (llm.max_requests)")
            self.used += 1


class RateLimiter:
    """Spaces calls at least ``1 / rate`` seconds apart (0 = no limit)."""

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = -float("inf")

    def acquire(self) -> None:
        if not self.interval:
            return
        now = self.clock()
        at = max(now, self._next)
        if at > now:
            self.sleep(at - now)
        self._next = at + self.interval


def backoff_delay(attempt: int, base: float, cap: float, jitter: float = 0.0) -> float:
    """Seconds before retry ``attempt`` (0-based): ``min(cap, base * 2**attempt) * (1 + jitter)``."""
    return min(cap, base * 2**attempt) * (1.0 + jitter)


# ----------------------------------------------------------------------------- OpenAI-compatible HTTP


class OpenAIClient:
    """``complete`` through ``{base_url}/completions`` or ``{base_url}/chat/completions``."""

    def __init__(
        self, cfg: LLMConfig, sleep: Callable[[float], None] = time.sleep, api_key: str | None = None
    ):
        self.cfg = cfg
        self.base_url = (cfg.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        # the key: given (a Ray actor gets the driver's), else from the environment; never logged
        self._key = api_key if api_key is not None else os.environ.get(cfg.api_key_env, "")
        self.budget = RequestBudget(cfg.max_requests)
        self.sleep = sleep
        self.attempts = 0  # HTTP attempts made, retries included
        self._counter: Any = None

    def __repr__(self) -> str:
        return f"OpenAIClient(base_url={self.base_url!r}, model={self.cfg.model!r}, api={self.cfg.api!r})"

    def complete(
        self, prompt: str, max_tokens: int, temperature: float = 0.0, stop: Sequence[str] = ()
    ) -> Completion:
        self.budget.take()
        body: dict[str, Any] = {"model": self.cfg.model, "max_tokens": max_tokens, "temperature": temperature}
        if stop and self.cfg.send_stop:
            body["stop"] = list(stop)[:4]  # the API takes at most 4 stop sequences
        if self.cfg.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            if self.cfg.logprobs:
                body["logprobs"] = True
            data = self._post("/chat/completions", body)
            choice = _first_choice(data)
            text = (choice.get("message") or {}).get("content") or ""
            content = (choice.get("logprobs") or {}).get("content") or []
            tokens = tuple(str(t.get("token", "")) for t in content)
            lps = tuple(float(t["logprob"]) for t in content) if content else None
        else:
            body["prompt"] = prompt
            if self.cfg.logprobs:
                body["logprobs"] = 1
            data = self._post("/completions", body)
            choice = _first_choice(data)
            text = choice.get("text") or ""
            lp = choice.get("logprobs") or {}
            tokens = tuple(str(t) for t in lp.get("tokens") or ())
            raw = lp.get("token_logprobs") or ()
            lps = tuple(float(v) if v is not None else float("nan") for v in raw) if raw else None
        return Completion(_cut_at_stop(text, stop), tokens, lps)

    def count_tokens(self, text: str) -> int | None:
        if not self.cfg.count_tokenizer:
            return None
        if self._counter is None:
            self._counter = _load_hf_tokenizer(self.cfg.count_tokenizer)
        return len(self._counter(text, add_special_tokens=False)["input_ids"])

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.base_url + route
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        payload = json.dumps(body).encode()
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            self.attempts += 1
            retry_after: float | None = None
            try:
                req = urllib.request.Request(url, data=payload, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                detail = _safe_body(e)
                if e.code not in RETRY_STATUS:
                    raise LLMError(f"POST {url}: HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
                retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(e).__name__}: {reason}"
            except json.JSONDecodeError as e:
                raise LLMError(f"POST {url}: the response is not JSON ({e})") from None
            if attempt < self.cfg.max_retries:
                delay = backoff_delay(
                    attempt, self.cfg.backoff_s, self.cfg.backoff_max_s, random.random() / 4
                )
                delay = max(delay, retry_after or 0.0)
                log.warning("POST %s failed (%s); retry %d in %.1fs", url, last, attempt + 1, delay)
                self.sleep(delay)
        raise LLMError(f"POST {url} failed after {self.cfg.max_retries + 1} attempts; last error: {last}")


def _first_choice(data: dict[str, Any]) -> dict[str, Any]:
    choices = data.get("choices") or []
    if not choices:
        raise LLMError(f"the response has no choices: {str(data)[:300]}")
    return choices[0]


def _safe_body(e: urllib.error.HTTPError) -> str:
    try:
        return e.read().decode(errors="replace")[:300]
    except Exception:  # noqa: BLE001 - the body is only decoration for the message
        return e.reason if isinstance(e.reason, str) else ""


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Servers may return text past a stop sequence (or ignore ``stop``): cut at the first one."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def _load_hf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=Path(path).exists())


# ----------------------------------------------------------------------------- local Hugging Face


class HFClient:
    """A local causal LM folder (``AutoModelForCausalLM``): greedy or sampled generation in process."""

    def __init__(self, cfg: LLMConfig):
        import torch
        from transformers import AutoModelForCausalLM

        if not Path(cfg.model).is_dir():
            raise FileNotFoundError(f"llm.model={cfg.model!r} is not a local model folder")
        self.cfg = cfg
        self.tokenizer = _load_hf_tokenizer(cfg.model)
        self.model = (
            AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=True).to(cfg.device).eval()
        )
        self.budget = RequestBudget(cfg.max_requests)
        self._torch = torch
        self._calls = 0
        conf = self.model.config
        self.context_window = cfg.context_window or int(
            getattr(conf, "max_position_embeddings", 0) or getattr(conf, "n_positions", 0) or 0
        )

    def __repr__(self) -> str:
        return f"HFClient(model={self.cfg.model!r}, device={self.cfg.device!r})"

    def count_tokens(self, text: str) -> int | None:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def complete(
        self, prompt: str, max_tokens: int, temperature: float = 0.0, stop: Sequence[str] = ()
    ) -> Completion:
        torch = self._torch
        enc = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(self.cfg.device)
        n_in = int(enc["input_ids"].shape[1])
        if self.context_window and n_in + max_tokens > self.context_window:
            raise LLMError(
                f"prompt of {n_in} tokens + {max_tokens} new tokens exceeds the context window "
                f"{self.context_window}"
            )
        self.budget.take()
        self._calls += 1
        torch.manual_seed(self.cfg.seed + self._calls)
        sample = temperature > 0
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                max_new_tokens=max_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_k=None,
                top_p=None,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=pad,
            )
            scores = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        new = out.sequences[0, n_in:].tolist()
        lps = scores[0].tolist()
        # keep the tokens up to the first stop sequence
        keep = len(new)
        for k in range(1, len(new) + 1):
            if any(s and s in self.tokenizer.decode(new[:k], skip_special_tokens=True) for s in stop):
                keep = k
                break
        text = _cut_at_stop(self.tokenizer.decode(new[:keep], skip_special_tokens=True), stop)
        tokens = tuple(self.tokenizer.convert_ids_to_tokens(new[:keep]))
        return Completion(text, tokens, tuple(float(v) for v in lps[:keep]))


# ----------------------------------------------------------------------------- factory and batches


def make_client(
    cfg: LLMConfig, template: PromptTemplate = PromptTemplate(), api_key: str | None = None
) -> LanguageModel:
    if cfg.backend == "openai":
        return OpenAIClient(cfg, api_key=api_key)
    if cfg.backend == "hf":
        return HFClient(cfg)
    return ReferenceLearner(template)


def context_window(cfg: LLMConfig, client: LanguageModel) -> int:
    """The window to check prompts against: the config's, else the client's own, else 0 (unknown)."""
    return cfg.context_window or int(getattr(client, "context_window", 0) or 0)


class _Worker:
    """Holds one client; runs as a Ray actor (``complete_many``)."""

    def __init__(
        self,
        cfg: LLMConfig,
        template: PromptTemplate,
        client: LanguageModel | None = None,
        api_key: str | None = None,
    ):
        # the caller of complete_many owns the budget: the worker's own client has none
        self.client = client or make_client(replace(cfg, max_requests=0), template, api_key)

    def complete(self, prompt: str, max_tokens: int, temperature: float, stop: Sequence[str]) -> Any:
        try:
            return self.client.complete(prompt, max_tokens, temperature, stop)
        except BudgetExhausted as e:
            return Failure("budget", str(e))
        except Exception as e:  # noqa: BLE001 - one prompt's failure is a result, not a crash
            return Failure("error", f"{type(e).__name__}: {e}")


def complete_many(
    cfg: LLMConfig,
    prompts: Sequence[str],
    max_tokens: int,
    temperature: float = 0.0,
    stop: Sequence[str] = (),
    template: PromptTemplate = PromptTemplate(),
    client: LanguageModel | None = None,
    budget: RequestBudget | None = None,
) -> list[Completion | Failure]:
    """One result per prompt, in order. ``cfg.concurrency > 1`` runs Ray actors (Ray must be
    initialised, e.g. by ``pipeline.runtime.ray_utils.init_ray``); otherwise ``client`` (or a new one) in
    process.
    Prompts past the request budget (``budget``, shared across calls, else a new one of
    ``cfg.max_requests``) are not sent: they come back as ``Failure("budget", ...)``."""
    budget = budget if budget is not None else RequestBudget(cfg.max_requests)
    limiter = RateLimiter(cfg.requests_per_s)
    results: list[Completion | Failure | None] = [None] * len(prompts)
    if cfg.concurrency <= 1 or cfg.backend == "reference":
        worker = _Worker(cfg, template, client)
        for i, prompt in enumerate(prompts):
            try:
                budget.take()
            except BudgetExhausted as e:
                results[i] = Failure("budget", str(e))
                continue
            limiter.acquire()
            results[i] = worker.complete(prompt, max_tokens, temperature, stop)
        return results  # type: ignore[return-value]

    import ray

    actor_cls = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)(_Worker)
    # workers on other nodes lack the driver's environment: hand them the key as an argument
    # (not through runtime_env, which the dashboard shows)
    key = os.environ.get(cfg.api_key_env) if cfg.backend == "openai" else None
    actors = [actor_cls.remote(cfg, template, None, key) for _ in range(cfg.concurrency)]
    idle = list(range(len(actors)))
    pending: dict[Any, tuple[int, int]] = {}  # ref -> (prompt index, actor index)
    queue = list(range(len(prompts)))
    try:
        while queue or pending:
            while queue and idle:
                i = queue.pop(0)
                try:
                    budget.take()
                except BudgetExhausted as e:
                    results[i] = Failure("budget", str(e))
                    continue
                limiter.acquire()
                a = idle.pop()
                pending[actors[a].complete.remote(prompts[i], max_tokens, temperature, list(stop))] = (i, a)
            if not pending:
                continue
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i, a = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - an actor died: the prompt failed
                    results[i] = Failure("error", f"{type(e).__name__}: {e}")
                idle.append(a)
    finally:
        for actor in actors:
            ray.kill(actor)
    return results  # type: ignore[return-value]
