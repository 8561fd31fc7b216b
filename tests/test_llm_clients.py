"""LLM clients: a tiny random causal LM in process and behind ``transformers serve`` (real
OpenAI-compatible routes), retries/timeouts/budget against a scripted local server, Ray batches."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from icl_helpers import Served, build_tiny_lm

from pipeline.llm.llm import (
    BudgetExhausted,
    Failure,
    HFClient,
    LLMConfig,
    LLMError,
    OpenAIClient,
    RateLimiter,
    backoff_delay,
    complete_many,
)
from spae.icl.learners import Completion, LanguageModel, check_budget

PROMPT = "Input: [L1] seven [L2] a b c d\nOutput: seven\nInput: [L1] one [L2] x y z w\nOutput:"
SECRET = "sk-test-do-not-leak-1234"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="module")
def hf(tiny_lm) -> HFClient:
    return HFClient(LLMConfig(backend="hf", model=str(tiny_lm)))


@pytest.fixture(scope="module")
def served(tiny_lm, tmp_path_factory):
    server = Served(tiny_lm, tmp_path_factory.mktemp("serve") / "serve.log")
    yield server
    server.stop()


def test_hf_client_end_to_end(hf):
    assert isinstance(hf, LanguageModel) and hf.context_window == 1024
    out = hf.complete(PROMPT, max_tokens=6)
    assert out.text.strip() and len(out.tokens) == 6 == len(out.logprobs)
    assert all(lp <= 0 for lp in out.logprobs)
    assert hf.complete(PROMPT, max_tokens=6) == out  # greedy is deterministic
    n = hf.count_tokens(PROMPT)
    assert n == len(hf.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]) and n > 20
    # stop sequences cut the text (and the tokens) at their first occurrence
    stop = out.tokens[1]
    cut = hf.complete(PROMPT, max_tokens=6, stop=[stop])
    assert stop not in cut.text and len(cut.tokens) <= 2 and out.text.startswith(cut.text.rstrip())
    sampled = hf.complete(PROMPT, max_tokens=6, temperature=1.0)
    assert len(sampled.tokens) == 6


def test_hf_budget_and_context_window(tiny_lm, hf):
    small = HFClient(LLMConfig(backend="hf", model=str(tiny_lm), max_requests=1, context_window=30))
    n = small.count_tokens(PROMPT)
    check = check_budget(small, PROMPT, max_new_tokens=4, context_window=small.context_window)
    assert not check.fits and check.measured and check.prompt_tokens == n and check.overflow == n + 4 - 30
    with pytest.raises(LLMError, match="exceeds the context window 30"):
        small.complete(PROMPT, max_tokens=4)  # never truncated
    small.complete("Input: [L1] one\nOutput:", max_tokens=2)
    with pytest.raises(BudgetExhausted, match="budget of 1"):
        small.complete("Input: [L1] one\nOutput:", max_tokens=2)


@pytest.mark.slow
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_openai_client_against_transformers_serve(served, tiny_lm, hf, api, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    cfg = LLMConfig(
        backend="openai",
        model=str(tiny_lm),
        base_url=served.base_url,
        api=api,
        count_tokenizer=str(tiny_lm),
        timeout_s=60,
    )
    client = OpenAIClient(cfg)
    out = client.complete(PROMPT, max_tokens=5)
    words = out.text.split()
    assert words and all(w.lstrip("#") for w in words)
    vocab = hf.tokenizer.get_vocab()
    assert all(w in vocab or w.startswith("##") or hf.tokenizer.tokenize(w) for w in words)
    assert client.count_tokens(PROMPT) == hf.count_tokens(PROMPT)
    assert SECRET not in repr(client)
    # this server cannot map "\n" to WordPiece tokens and refuses the request (with a 4xx or a 5xx, by
    # release): the client surfaces the status and the server's own words; send_stop=false cuts client-side
    with pytest.raises(LLMError) as refused:
        OpenAIClient(replace(cfg, max_retries=0)).complete(PROMPT, 5, stop=["\n"])
    status, body = re.search(r"HTTP (\d{3}): (.*)", str(refused.value)).groups()
    assert 400 <= int(status) < 600 and body.strip(), str(refused.value)
    kept = OpenAIClient(replace(cfg, send_stop=False)).complete(PROMPT, 5, stop=["\n"])
    assert kept.text == out.text  # greedy, and no newline in WordPiece output
    # the batch helper drives the same client in process
    many = complete_many(cfg, [PROMPT, "Input: [L1] one\nOutput:"], max_tokens=3, client=client)
    assert all(isinstance(r, Completion) and r.text.strip() for r in many)


# ----------------------------------------------------------------------------- scripted server


class _Script(BaseHTTPRequestHandler):
    """Replies from ``server.script`` (a list of (status, body, headers, delay)); echoes by default."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        srv.seen.append((self.path, dict(self.headers), body))
        status, reply, headers, delay = srv.script.pop(0) if srv.script else (200, None, {}, 0.0)
        time.sleep(delay)
        if reply is None:
            prompt = body.get("prompt") or body["messages"][0]["content"]
            if self.path.endswith("/chat/completions"):
                reply = {
                    "choices": [
                        {
                            "message": {"content": f"echo:{prompt}"},
                            "logprobs": {"content": [{"token": "echo", "logprob": -0.5}]},
                        }
                    ]
                }
            else:
                reply = {
                    "choices": [
                        {
                            "text": f"echo:{prompt}\nmore",
                            "logprobs": {"tokens": ["echo", ":"], "token_logprobs": [-0.25, -1.0]},
                        }
                    ]
                }
        data = json.dumps(reply).encode()
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture()
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Script)
    server.script, server.seen = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()


def _client(server, sleeps, **kw) -> OpenAIClient:
    cfg = LLMConfig(backend="openai", model="m", base_url=server.base_url, backoff_s=0.5, **kw)
    return OpenAIClient(cfg, sleep=sleeps.append)


def test_request_format_logprobs_and_key(scripted, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    client = _client(scripted, [])
    out = client.complete("hi", max_tokens=3, stop=["\n"])
    assert out == Completion("echo:hi", ("echo", ":"), (-0.25, -1.0))  # cut at the stop sequence
    path, headers, body = scripted.seen[0]
    assert path == "/v1/completions" and headers["Authorization"] == f"Bearer {SECRET}"
    assert body == {
        "model": "m",
        "max_tokens": 3,
        "temperature": 0.0,
        "stop": ["\n"],
        "prompt": "hi",
        "logprobs": 1,
    }
    chat = _client(scripted, [], api="chat").complete("yo", max_tokens=2)
    assert chat == Completion("echo:yo", ("echo",), (-0.5,)) and scripted.seen[1][0] == "/v1/chat/completions"


def test_retries_with_backoff_then_success(scripted):
    sleeps: list[float] = []
    scripted.script += [
        (503, {"error": "busy"}, {}, 0.0),
        (429, {"error": "slow down"}, {"Retry-After": "7"}, 0.0),
    ]
    client = _client(scripted, sleeps, max_retries=3)
    assert client.complete("x", 2, stop=["\n"]).text == "echo:x" and client.attempts == 3
    assert 0.5 <= sleeps[0] <= 0.625 and sleeps[1] == 7.0  # backoff_s * 2**0 (+jitter), then Retry-After
    assert backoff_delay(0, 1.0, 30.0) == 1.0 and backoff_delay(3, 1.0, 30.0) == 8.0
    assert backoff_delay(6, 1.0, 30.0) == 30.0 and backoff_delay(1, 1.0, 30.0, 0.25) == 2.5


def test_non_retryable_error_and_give_up(scripted, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    sleeps: list[float] = []
    scripted.script.append((400, {"error": "bad model"}, {}, 0.0))
    client = _client(scripted, sleeps, max_retries=3)
    with pytest.raises(LLMError, match="HTTP 400.*bad model") as err:
        client.complete("x", 2)
    assert client.attempts == 1 and sleeps == [] and SECRET not in str(err.value)
    scripted.script += [(500, {"error": "boom"}, {}, 0.0)] * 3
    with pytest.raises(LLMError, match="after 3 attempts; last error: HTTP 500"):
        _client(scripted, sleeps, max_retries=2).complete("x", 2)


def test_timeout_is_retried_then_reported(scripted):
    scripted.script += [(200, None, {}, 1.5), (200, None, {}, 1.5)]
    client = _client(scripted, [], max_retries=1, timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(LLMError, match="after 2 attempts.*(timed out|Timeout)"):
        client.complete("x", 2)
    assert time.monotonic() - t0 < 1.5


def test_unreachable_server_fails_fast():
    cfg = LLMConfig(backend="openai", model="m", base_url="http://127.0.0.1:9/v1", max_retries=1)
    with pytest.raises(LLMError, match="127.0.0.1:9.*after 2 attempts"):
        OpenAIClient(cfg, sleep=lambda s: None).complete("x", 2)


def test_rate_limiter_hand_computed():
    now = [0.0]
    slept: list[float] = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.acquire()
    assert slept == [0.25, 0.25]
    now[0] += 1.0  # idle time is not banked beyond one slot
    limiter.acquire()
    assert slept == [0.25, 0.25]
    RateLimiter(0.0, clock=lambda: 0.0, sleep=sleep).acquire()  # no limit: no sleep
    assert len(slept) == 2


def test_complete_many_budget_in_process(scripted):
    cfg = LLMConfig(backend="openai", model="m", base_url=scripted.base_url, max_requests=2)
    out = complete_many(cfg, ["a", "b", "c"], max_tokens=2, stop=["\n"])
    assert [o.text for o in out[:2]] == ["echo:a", "echo:b"]
    assert isinstance(out[2], Failure) and out[2].kind == "budget" and len(scripted.seen) == 2
    scripted.script.append((400, {"error": "nope"}, {}, 0.0))
    bad = complete_many(
        LLMConfig(backend="openai", model="m", base_url=scripted.base_url), ["a", "b"], 2, stop=["\n"]
    )
    assert isinstance(bad[0], Failure) and bad[0].kind == "error" and "HTTP 400" in bad[0].reason
    assert bad[1].text == "echo:b"


@pytest.mark.slow
def test_complete_many_on_ray_actors_with_rate_limit(scripted, ray_cluster, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)  # set after the workers started: handed over by the driver
    cfg = LLMConfig(
        backend="openai",
        model="m",
        base_url=scripted.base_url,
        concurrency=2,
        requests_per_s=20.0,
        max_requests=5,
    )
    prompts = [f"p{i}" for i in range(6)]
    t0 = time.monotonic()
    out = complete_many(cfg, prompts, max_tokens=2, stop=["\n"])
    assert time.monotonic() - t0 >= 4 / 20  # 5 sends, spaced 1/20 s apart
    assert [o.text for o in out[:5]] == [f"echo:p{i}" for i in range(5)]  # in prompt order
    assert isinstance(out[5], Failure) and out[5].kind == "budget"
    assert sorted(b["prompt"] for _, _, b in scripted.seen) == prompts[:5]
    assert {h["Authorization"] for _, h, _ in scripted.seen} == {f"Bearer {SECRET}"}


# ----------------------------------------------------------------------------- the LLM in the harness


def test_hf_lm_writes_a_pyramid_that_decodes_to_an_image(hf):
    """Eq. 11 with a real (random) causal LM: segment prompts, answers in its own words, tolerant
    parse and a decoded image."""
    import torch

    from spae.codebook import FrozenCodebook
    from spae.icl.decoding import (
        DecodingConfig,
        decode_image,
        generation_task,
        plan_segments,
        progressive_decode,
    )
    from spae.icl.episodes import LabelledImages
    from spae.model import SPAE, preset
    from spae.tokenizer import SPAETokenizer

    words = [w for w in list(hf.tokenizer.get_vocab())[2000:2400] if w.isalpha()][:64]
    emb = torch.nn.functional.normalize(
        torch.randn(len(words), 384, generator=torch.Generator().manual_seed(0)), dim=1
    )
    torch.manual_seed(0)
    tok = SPAETokenizer(SPAE(preset("tiny"), FrozenCodebook.from_tensor(emb, words)))
    pyr = tok.encode(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    per_image = [tuple(tuple(pyr.words(l)[b]) for l in pyr.layers) for b in range(4)]
    images = LabelledImages.from_rows([f"i{b}" for b in range(4)], [0, 1, 0, 1], per_image)
    task = generation_task(images, query="an image of 1+0", num_context=4)
    cfg = DecodingConfig(nar_stride=8, max_tokens_per_word=2, context_window=hf.context_window)
    res = progressive_decode(hf, task, tok.pyramid.token_counts, cfg)
    assert res.complete and [s.segment for s in res.steps] == plan_segments(tok.pyramid.token_counts, cfg)
    assert all(0 < s.prompt_tokens <= hf.context_window for s in res.steps)  # counted in the LM's tokens
    assert [len(l) for l in res.words] == list(tok.pyramid.token_counts)
    out = decode_image(tok, res.text)
    assert tuple(out.image.shape) == (1, 3, 16, 16) and out.up_to_layer == 4
    assert float(out.image.min()) >= 0.0 and float(out.image.max()) <= 1.0


def test_grid_with_the_hf_lm_measures_prompts_in_its_tokens(hf, tiny_lm, tmp_path):
    from icl_helpers import write_corpus

    from pipeline.llm.icl import GridConfig, ICLJobConfig, run_grid

    corpus = write_corpus(tmp_path / "corpus")
    grid = GridConfig(preset="product", ways=(2,), layers=(2,), shots=(1,), repeats=(0, 5), induction=(True,))
    llm = LLMConfig(backend="hf", model=str(tiny_lm), context_window=200)
    res = run_grid(
        ICLJobConfig(corpus=str(corpus), output=str(tmp_path / "o"), episodes=3, llm=llm, grid=grid)
    )
    eps = res.episodes.to_pylist()
    assert all(e["tokens_measured"] for e in eps)
    assert all(e["prompt_tokens"] == hf.count_tokens(e["prompt"]) for e in eps)
    short, long = res.results.to_pylist()
    assert (
        short["overflow"] == 0 and short["scored"] == 3 and long["overflow"] == 3
    )  # 2x6 examples do not fit
    assert all(e["completion"] for e in eps if e["status"] in ("ok", "invalid"))
