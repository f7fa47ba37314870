"""The OpenAI-compatible HTTP API on a real local deployment (router + prefill + decode
processes), driven by the official `openai` package and plain HTTP: completions and chat,
streaming and not, usage, stop, seeds, n, token ids against the in-process engine and against
transformers' chat template rendering, every error status, and a disconnect that frees pages.
One deployment serves the whole module; the last test drains it."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
from pathlib import Path

import urllib.error
import urllib.request

import openai
import pytest

import serving_helpers as sh

pytestmark = pytest.mark.slow

TOKEN = "sk-test-jaxpd"
MODEL = "austen"
CHAT = Path(__file__).resolve().parent / "fixtures" / "chat" / "headers"
PAGES = 48  # 752 tokens of KV per worker (one page is the null page)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai")
    (tmp / "token").write_text(TOKEN + "\n")
    config = sh.write_config(tmp / "deploy.yaml", model={"checkpoint": None, "name": MODEL},
                             kv={"page_size": 16, "num_pages": PAGES},
                             serving={"router": {"host": "127.0.0.1", "port": 0},
                                      "http": {"host": "127.0.0.1", "port": 0},
                                      # KV through shared memory here (test_serving: tcp,
                                      # test_multihost: gRPC)
                                      "transport": "shm",
                                      # a conversation's short new turn: prefilled where the
                                      # earlier turns' KV is (the decode worker)
                                      "local_prefill_max_tokens": 96,
                                      "auth_token_file": str(tmp / "token"),
                                      "max_request_bytes": 64 << 10, "max_queued": 0,
                                      "drain_timeout_s": 20})
    d = sh.start(config, extra_args=("--chat-template", str(CHAT / "chat_template.jinja")))
    assert d.http_url, "\n".join(d.lines[-20:])
    yield d
    if d.process.poll() is None:
        assert d.stop() == 0, "\n".join(d.lines[-40:])


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.http_url, api_key=TOKEN, max_retries=0, timeout=120)


class _LoadsWithToken:
    """What serving_helpers' page checks call (GetLoads), with the deployment's token."""

    def __init__(self, address: str):
        from jaxpd.serving.client import Client

        self.client = Client(address, token=TOKEN)

    def GetLoads(self, request, timeout=None):
        return self.client.loads(timeout=timeout)


@pytest.fixture(scope="module")
def stub(served):
    return _LoadsWithToken(served.address)


def _engine_tokens(prompt_ids: list[int], max_tokens: int) -> list[int]:
    """What `jaxpd generate` (the in-process engine) draws greedily for these prompt ids."""
    from jaxpd.config import parse_config
    from jaxpd.engine.builder import build_engine
    from jaxpd.engine.request import Request
    from jaxpd.engine.sampling import SamplingParams
    from jaxpd.model.checkpoint import load_model
    from jaxpd.tokenizer import merge_tokenizer_eos, tokenizer_for_checkpoint

    model = load_model()
    config = merge_tokenizer_eos(model.config, tokenizer_for_checkpoint(model.folder))
    engine = build_engine(config, model.params, parse_config({"kv": {"num_pages": 128}}))
    out = engine.run_to_completion([Request("r", tuple(prompt_ids),
                                            SamplingParams(max_tokens=max_tokens))])
    return list(out["r"].token_ids)


def test_models_health_and_metrics(served, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    base = served.http_url.removesuffix("/v1")
    assert _http(f"{base}/health", token=None).json() == {"status": "ok"}
    metrics = _http(f"{base}/metrics", token=None)
    assert metrics.status_code == 200 and "jaxpd:num_requests_waiting" in metrics.text


def test_completion_token_ids_equal_the_engine_and_usage_adds_up(client):
    result = client.completions.create(
        model=MODEL, prompt="It is a truth universally acknowledged, that", max_tokens=12,
        temperature=0, extra_body={"return_token_ids": True})
    (choice,) = result.choices
    extra = choice.model_extra
    assert extra["token_ids"] == _engine_tokens(extra["prompt_token_ids"], 12)
    assert choice.finish_reason == "length" and choice.text
    assert result.usage.prompt_tokens == len(extra["prompt_token_ids"])
    assert result.usage.completion_tokens == 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + 12
    # token ids in, the same tokens out
    again = client.completions.create(model=MODEL, prompt=extra["prompt_token_ids"],
                                      max_tokens=12, temperature=0,
                                      extra_body={"return_token_ids": True})
    assert again.choices[0].model_extra["token_ids"] == extra["token_ids"]


def test_streamed_completion_equals_the_whole_one(client):
    args = dict(model=MODEL, prompt="She was", max_tokens=16, temperature=0)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_chat_prompt_ids_equal_transformers_apply_chat_template(client):
    """The fixture's expected ids were rendered and tokenized by transformers."""
    expected = json.loads((CHAT / "expected.json").read_text())["cases"]
    case = next(c for c in expected if c["add_generation_prompt"] and c["error"] is None
                and len(c["messages"]) > 2)
    result = client.chat.completions.create(model=MODEL, messages=case["messages"],
                                            max_tokens=8, temperature=0,
                                            extra_body={"return_token_ids": True})
    choice = result.choices[0]
    assert choice.model_extra["prompt_token_ids"] == case["ids"]
    assert choice.message.role == "assistant" and choice.message.content
    assert result.usage.prompt_tokens == len(case["ids"])


def test_streamed_chat_with_usage_and_logprobs(client):
    messages = [{"role": "user", "content": "Tell me about Mr. Darcy."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                           temperature=0, logprobs=True)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, logprobs=True,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    logprobs = [lp.logprob for c in chunks if c.choices and c.choices[0].logprobs
                for lp in c.choices[0].logprobs.content]
    assert len(logprobs) == 10 and all(lp <= 0 for lp in logprobs)
    assert [lp.logprob for lp in whole.choices[0].logprobs.content] == pytest.approx(logprobs)
    assert chunks[-1].usage.completion_tokens == 10


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_a_chat_turn_prefills_only_what_is_new(client):
    """Turn 2 (short new text) is prefilled on the decode worker that holds turn 1's prompt
    and reply: only its new tokens are computed (usage.prompt_tokens_details.cached_tokens).
    Turn 3 (long new text) goes to the prefill worker, which ships only the KV the decode
    worker lacks; its tokens equal the in-process engine's on the whole prompt."""
    extra = {"return_token_ids": True}
    messages = [{"role": "user", "content": "Write about the ball at Netherfield and who "
                                            "danced with whom that evening."}]
    one = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                         temperature=0, extra_body=extra)
    held = one.choices[0].model_extra["prompt_token_ids"] + one.choices[0].model_extra["token_ids"]
    messages += [{"role": "assistant", "content": one.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    two = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                         temperature=0, extra_body=extra)
    ids = two.choices[0].model_extra["prompt_token_ids"]
    reused = _common_prefix(held[:-1], ids[:-1]) // 16 * 16  # whole pages the worker kept
    assert reused >= len(held) - 16 - 2  # the template re-renders the reply the same way
    assert two.usage.prompt_tokens_details.cached_tokens == reused
    assert two.usage.prompt_tokens - reused < 16 + 80  # the new turn and a partial page
    messages += [{"role": "assistant", "content": two.choices[0].message.content},
                 {"role": "user", "content": " ".join(["Tell me more about Mr. Bingley, his "
                                                       "sisters, and Mr. Darcy's pride."] * 4)}]
    three = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                           temperature=0, extra_body=extra)
    ids = three.choices[0].model_extra["prompt_token_ids"]
    # prefilled on the prefill worker, which holds at most turn 1's prompt (when turn 1 was
    # prefilled there: a decode worker holding a shared first block may have taken it)
    first_prompt = len(one.choices[0].model_extra["prompt_token_ids"])
    assert three.usage.prompt_tokens_details.cached_tokens <= (first_prompt - 1) // 16 * 16
    assert three.choices[0].model_extra["token_ids"] == _engine_tokens(ids, 6)


def test_stop_seed_and_n(client):
    stopped = client.completions.create(model=MODEL, prompt="It is a truth universally",
                                        max_tokens=40, temperature=0, stop=[" the", ","])
    assert stopped.choices[0].finish_reason == "stop"
    assert " the" not in stopped.choices[0].text and "," not in stopped.choices[0].text
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=12,
                temperature=1.0, seed=1234)
    first = client.chat.completions.create(**args, n=2)
    second = client.chat.completions.create(**args, n=2)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in second.choices]  # seeded: reproducible
    assert [c.index for c in first.choices] == [0, 1]
    assert texts[0] != texts[1]  # n choices draw differently
    assert first.usage.completion_tokens == sum(
        12 if c.finish_reason == "length" else 1 for c in first.choices) or \
        first.usage.completion_tokens <= 24
    streamed = list(client.chat.completions.create(**args, n=2, stream=True))
    by_index = {0: "", 1: ""}
    for c in streamed:
        for ch in c.choices:
            by_index[ch.index] += ch.delta.content or ""
    assert [by_index[0], by_index[1]] == texts


class _Response:
    def __init__(self, status: int, body: bytes):
        self.status_code, self.text = status, body.decode()

    def json(self):
        return json.loads(self.text)


def _http(url: str, body=None, token: str | None = TOKEN) -> _Response:
    """A plain HTTP request (GET without a body); any status comes back, none raises."""
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    data = None if body is None else (
        body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return _Response(r.status, r.read())
    except urllib.error.HTTPError as e:
        return _Response(e.code, e.read())


def _post(served, path: str, body, token: str | None = TOKEN) -> _Response:
    return _http(f"{served.http_url}{path}", body, token)


@pytest.mark.parametrize("body, status, param", [
    ({"model": MODEL, "prompt": "x", "echo": True}, 400, "echo"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": 0.3}, 400, "frequency_penalty"),
    ({"model": MODEL, "prompt": "x", "made_up": 1}, 400, "made_up"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": [99999]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
])
def test_bad_requests_get_openai_shaped_errors(served, body, status, param):
    response = _post(served, "/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] and error["message"]


def test_chat_errors_name_what_to_fix(served):
    tools = _post(served, "/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": "x"}], "tools": [{"type": "function"}]})
    assert tools.status_code == 400 and tools.json()["error"]["param"] == "tools"
    image = _post(served, "/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert image.status_code == 400 and "only text parts" in image.json()["error"]["message"]
    assert _post(served, "/chat/completions", b"{not json").status_code == 400
    assert _post(served, "/chat/completions", b"[" * 30000 + b"]" * 30000).status_code == 400
    assert _post(served, "/chat/completions", {"model": MODEL, "messages": []}).status_code == 400


def test_auth_size_and_routes(served):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert _post(served, "/completions", body, token=None).status_code == 401
    assert _post(served, "/completions", body, token="wrong").json()["error"]["type"] == \
        "authentication_error"
    huge = _post(served, "/completions", {"model": MODEL, "prompt": "x" * (80 << 10)})
    assert huge.status_code == 413 and "serving.max_request_bytes" in huge.json()["error"]["message"]
    missing = _post(served, "/nowhere", body)
    assert missing.status_code == 404 and "error" in missing.json()


def test_a_full_queue_is_429_and_a_disconnect_frees_its_pages(served, client, stub):
    """A long prompt holds most of the decode pool; another cannot get pages and may not wait
    at the router (max_queued 0): 429. The first client then goes away mid-stream and its
    pages come back."""
    def prompt(i: int) -> list[int]:
        return [(97 * i + k) % 3900 + 5 for k in range(600)]  # 38 of the pool's 47 pages
    first = client.completions.create(model=MODEL, prompt=prompt(0), max_tokens=140,
                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
    next(iter(first))
    assert sh.pages_in_use(stub)["decode-0"] >= 38
    full = _post(served, "/completions", {"model": MODEL, "prompt": prompt(1), "max_tokens": 4})
    assert full.status_code == 429, full.text
    assert full.json()["error"]["type"] == "rate_limit_error"
    first.close()  # the client disconnects mid-stream
    ok, used = sh.wait_pages_free(stub, within=10.0)
    assert ok, used


def test_draining_is_503_and_running_streams_finish(served, client):
    """Runs last: SIGTERM; a running stream finishes, a new request is 503, all exit 0."""
    def run():
        return client.completions.create(model=MODEL, prompt="Finally,", max_tokens=400,
                                         temperature=0, extra_body={"ignore_eos": True})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(run)
        time.sleep(0.5)
        served.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = _post(served, "/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        result = future.result(timeout=60)
    assert refused.status_code == 503, refused.text
    assert result.usage.completion_tokens == 400
    assert served.process.wait(60) == 0, "\n".join(served.lines[-30:])


def test_request_models_refuse_by_name_what_jaxpd_cannot_do():
    """No deployment: the body checks alone."""
    from jaxpd.serving.openai_schema import ChatRequest, CompletionRequest

    ok = CompletionRequest.model_validate({"model": "m", "prompt": "x", "presence_penalty": 0,
                                           "logit_bias": {}, "echo": False, "best_of": 1})
    assert ok.refused() is None
    assert CompletionRequest.model_validate(
        {"model": "m", "prompt": "x", "best_of": 3}).refused()[0] == "best_of"
    assert ChatRequest.model_validate({"model": "m", "messages": [{"role": "user",
                                       "content": "x"}], "top_logprobs": 2}).refused()[0] == \
        "top_logprobs"
    assert CompletionRequest.model_validate(
        {"model": "m", "prompt": [[1, 2], [3]]}).prompts() == [[1, 2], [3]]
    with pytest.raises(ValueError, match="more than 64 choices"):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a"] * 10, "n": 7})
    with pytest.raises(ValueError):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": float("nan")})
    with pytest.raises(ValueError):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "seed": -1})
