"""Teacher distillation: pure prompt/validation/limiter logic on literals, the chat client against
real loopback HTTP servers, and ``appliance distill`` against a real llama.cpp server on SmolLM2."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from appliance.samples import make_sample
from tests.conftest import REPO, wait_for
from train.chat_client import (
    ChatClient,
    TeacherError,
    TokenBucket,
    backoff_delay,
    parse_retry_after,
    read_api_key,
)
from train.data import Obj, Provenance, Record, read_records, write_records
from train.data.records import PERSPECTIVES
from train.distill import (
    AnswerCache,
    Tally,
    answer_problem,
    cache_key,
    clean_answer,
    image_data_url,
    make_client,
    progress_text,
    run_distill,
    teacher_messages,
)
from train.prompts import Question
from train.recipe import load_recipe

API_KEY = "sk-test-7f3a-never-printed"
RECORD = Record(
    image=Path("/data/plate_1.png"),
    width=160,
    height=120,
    objects=(Obj("scratch", (12.0, 40.0, 130.5, 77.0), {"severity": "minor"}),),
)
WHAT_WHERE = Question("what_where", "Where is the scratch in this image?")


# --- pure: prompts, validation, cache key, limiter, backoff -----------------------------------


def test_teacher_messages_carry_ground_truth_and_optional_image():
    text_only = teacher_messages(RECORD, WHAT_WHERE, None)
    assert [m["role"] for m in text_only] == ["system", "user"]
    user = text_only[1]["content"]
    assert isinstance(user, str)
    assert "- scratch at [12, 40, 130.5, 77] (severity: minor)" in user
    assert "160 x 120 pixels" in user and user.endswith("Where is the scratch in this image?")
    assert "cannot see the picture" in text_only[0]["content"]
    with_image = teacher_messages(RECORD, WHAT_WHERE, "data:image/png;base64,AAAA")
    parts = with_image[1]["content"]
    assert parts[0] == {"type": "text", "text": user}
    assert parts[1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    good = Record(image=Path("/data/good.png"), width=8, height=8)
    assert (
        "- none: the part has no defect." in teacher_messages(good, WHAT_WHERE, None)[1]["content"]
    )


def test_image_data_url_is_the_png(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 3), (255, 0, 0)).save(path)
    url = image_data_url(path)
    assert url.startswith("data:image/png;base64,iVBORw0KGgo")
    bmp = tmp_path / "b.bmp"
    Image.new("RGB", (4, 3)).save(bmp)
    assert image_data_url(bmp).startswith("data:image/png;base64,")


def test_cache_key_depends_on_model_messages_and_params():
    messages = teacher_messages(RECORD, WHAT_WHERE, None)
    params = {"max_tokens": 48, "temperature": 0.0, "seed": 0}
    key = cache_key("m", messages, params)
    assert key == cache_key("m", json.loads(json.dumps(messages)), dict(reversed(params.items())))
    assert len(key) == 64
    assert key != cache_key("other", messages, params)
    assert key != cache_key("m", messages, {**params, "seed": 1})
    assert key != cache_key("m", teacher_messages(RECORD, WHAT_WHERE, "data:x"), params)


@pytest.mark.parametrize(
    ("answer", "perspective", "problem"),
    [
        ("", "causes", "empty"),
        ("Too short.", "causes", "shorter than min_answer_chars"),
        ("x" * 300, "causes", "longer than max_answer_chars"),
        ("I'm sorry, but I cannot help with that request.", "causes", "a refusal"),
        ("As an AI I am unable to see the image you sent.", "repair", "a refusal"),
        ("The ground truth box shows a scratch on the left.", "causes", "mentions the annotations"),
        ("A long dark line runs across the upper left edge.", "what_where", "does not name"),
        ("A long scratch runs across the upper left of the plate.", "what_where", None),
        ("Handling contact during transport scrapes the surface.", "causes", None),
    ],
)
def test_answer_rules(answer, perspective, problem):
    found = answer_problem(answer, perspective, ["scratch"], min_chars=20, max_chars=200)
    assert (found is None) if problem is None else found.startswith(problem)


def test_what_where_needs_every_label():
    answer = "A scratch and a dent are visible on the rim."
    assert answer_problem(answer, "what_where", ["scratch", "dent"], 5, 500) is None
    problem = answer_problem(answer, "what_where", ["scratch", "oil_stain"], 5, 500)
    assert problem == "does not name the defect(s) oil stain"
    assert answer_problem("A good part without any flaw.", "what_where", [], 5, 500) is None


def test_clean_answer_cuts_truncated_answers_to_full_sentences():
    assert clean_answer("<think>hmm</think> Fine. Done", "stop") == "Fine. Done"
    assert clean_answer("One sentence. Two is cut", "length") == "One sentence."
    assert clean_answer("Nothing complete here", "length") == ""
    assert clean_answer("Version 1.5 is fine. Then", "length") == "Version 1.5 is fine."


def test_backoff_grows_with_jitter_and_cap():
    rng = random.Random(0)
    delays = [backoff_delay(a, 1.0, 10.0, rng) for a in range(6)]
    for attempt, delay in enumerate(delays):
        full = min(10.0, 2.0**attempt)
        assert full / 2 <= delay <= full
    assert len({round(d, 6) for d in delays[4:]}) == 2  # jitter: capped delays still differ


def test_parse_retry_after():
    assert parse_retry_after("3", now=0) == 3.0
    assert parse_retry_after("-1", now=0) == 0.0
    assert parse_retry_after("99999", now=0) == 300.0
    assert parse_retry_after("soon", now=0) is None
    assert parse_retry_after(None, now=0) is None
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 7, usegmt=True), now=now) == pytest.approx(7, abs=1)


class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_token_bucket_on_a_fake_clock():
    clock = FakeClock()
    bucket = TokenBucket(per_minute=30, burst=2, clock=clock, sleep=clock.sleep)
    waits = [bucket.acquire() for _ in range(5)]
    assert waits == [0.0, 0.0, 2.0, 2.0, 2.0]  # burst of 2, then one every 60/30 s
    assert clock.now == 106.0
    clock.now += 3600  # a long idle refills only up to the burst
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, 2.0]
    # pure: reservations at one instant queue up, each a further 2 s away
    assert [bucket.reserve(clock.now) for _ in range(2)] == [2.0, 4.0]
    with pytest.raises(ValueError):
        TokenBucket(per_minute=0)


def test_answer_cache_survives_a_torn_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = AnswerCache(path)
    cache.add({"key": "a", "text": "first"})
    with open(path, "ab") as handle:
        handle.write(b'{"key": "b", "te')  # killed mid-write
    reopened = AnswerCache(path)
    assert reopened.damaged == 1 and reopened.get("a")["text"] == "first"
    assert reopened.get("b") is None
    reopened.add({"key": "c", "text": "third"})
    again = AnswerCache(path)
    assert again.get("c")["text"] == "third" and again.damaged == 1
    assert path.read_text().splitlines()[-1] == '{"key": "c", "text": "third"}'


def test_progress_text_shows_eta():
    tally = Tally(asked=10, cached=2, prompt_tokens=1234, completion_tokens=567)
    text = progress_text(12, 40, 15.0, tally)
    assert text == "distill 12/40 (30%) 0.80 q/s ETA 0:00:35 | 10 asked, 2 cached | 1234+567 tokens"
    assert "ETA ?" in progress_text(0, 4, 0.0, Tally())


def test_read_api_key(tmp_path):
    path = tmp_path / "key"
    path.write_text(f"  {API_KEY}\n")
    path.chmod(0o600)
    assert read_api_key(path) == API_KEY
    with pytest.raises(TeacherError, match="does not exist"):
        read_api_key(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(TeacherError, match="is empty"):
        read_api_key(tmp_path / "empty")


# --- the client against a real loopback HTTP server -------------------------------------------

COMPLETION = {
    "model": "scripted",
    "choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 1},
}


class ScriptedServer:
    """A real HTTP server that answers each POST with the next (status, headers, body)."""

    def __init__(self, script: list[tuple[int, dict, dict]]):
        self.script, self.seen = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                outer.seen.append(
                    (self.path, dict(self.headers), json.loads(self.rfile.read(length)))
                )
                status, headers, body = outer.script.pop(0) if outer.script else (500, {}, {})
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_retry_after_429_then_success(scripted):
    server = scripted([(429, {"Retry-After": "2"}, {"error": {"message": "slow down"}}),
                       (200, {}, COMPLETION)])  # fmt: skip
    slept: list[float] = []
    client = ChatClient(server.url, "m", api_key=API_KEY, backoff=0.01, sleep=slept.append)
    result = client.chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, seed=3)
    assert (result.text, result.prompt_tokens, result.completion_tokens) == ("ok", 7, 1)
    assert result.model == "scripted" and result.finish_reason == "stop"
    assert slept == [2.0]  # Retry-After wins over the 0.01 s backoff
    assert (client.stats.requests, client.stats.retries, client.stats.prompt_tokens) == (2, 1, 7)
    path, headers, body = server.seen[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == f"Bearer {API_KEY}"
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4, "temperature": 0, "seed": 3}  # fmt: skip
    assert API_KEY not in repr(client)


def test_5xx_backs_off_exponentially_then_gives_up(scripted):
    server = scripted([(503, {}, {"detail": "overloaded"})] * 4)
    slept: list[float] = []
    client = ChatClient(server.url, "m", max_retries=3, backoff=1.0, sleep=slept.append)
    with pytest.raises(TeacherError, match="gave up after 4 attempts.*HTTP 503 \\(overloaded\\)"):
        client.chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert len(server.seen) == 4 and len(slept) == 3
    for attempt, delay in enumerate(slept):
        assert 2.0**attempt / 2 <= delay <= 2.0**attempt


def test_client_errors_are_not_retried(scripted):
    server = scripted([(400, {}, {"error": {"message": "max_tokens too large"}})])
    client = ChatClient(server.url, "m", sleep=lambda s: pytest.fail("must not retry"))
    with pytest.raises(TeacherError, match="HTTP 400 \\(max_tokens too large\\)") as info:
        client.chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert info.value.status == 400 and len(server.seen) == 1


def test_connection_refused_is_retried():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nobody listens there
    slept: list[float] = []
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, sleep=slept.append)
    with pytest.raises(TeacherError, match="gave up after 3 attempts.*connection failed"):
        client.chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert client.stats.requests == 3 and len(slept) == 2


# --- a real llama.cpp server on SmolLM2 as the teacher ----------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _models_answer(url: str) -> bool:
    request = urllib.request.Request(
        url + "/models", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """``python -m llama_cpp.server`` on SmolLM2-135M with an API key; yields its /v1 URL."""
    pytest.importorskip("uvicorn", reason="llama-cpp-python's server needs the dev extra")
    pytest.importorskip("sse_starlette", reason="llama-cpp-python's server needs the dev extra")
    from appliance.models import default_narrative_gguf

    try:
        gguf = default_narrative_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    port = _free_port()
    log = open(tmp_path_factory.mktemp("teacher") / "server.log", "w")  # noqa: SIM115
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
               "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", "2048", "--api_key", API_KEY, "--verbose", "False"]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        if not wait_for(lambda: _models_answer(url) or process.poll() is not None, timeout=90):
            pytest.fail("llama_cpp.server did not answer /v1/models within 90 s")
        if process.poll() is not None:
            pytest.fail(f"llama_cpp.server exited with {process.returncode}; see {log.name}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def make_records(root: Path) -> Path:
    """Three tiny sample images (scratch, crack, good) and their records file."""
    (root / "images").mkdir(parents=True)
    records = []
    for seed, kind in ((1, "scratch"), (2, "crack"), (3, None)):
        sample = make_sample(seed, defect=kind, height=48, width=64)
        image = root / "images" / f"{kind or 'good'}_{seed}.png"
        Image.fromarray(sample.rgb).save(image)
        objects = (Obj(kind, tuple(float(v) for v in sample.box)),) if kind else ()
        records.append(Record(image.absolute(), 64, 48, objects, provenance=Provenance("dataset")))
    return write_records(root / "records.jsonl", records)


def write_recipe(root: Path, url: str, *, attach_image: bool = False, extra: str = "") -> Path:
    key = root / "teacher.key"
    key.write_text(API_KEY + "\n")
    key.chmod(0o600)
    recipe = root / "recipe.toml"
    recipe.write_text(f"""
[data]
path = "data/records.jsonl"
labels = ["scratch", "crack", "spot"]

[distill]
base_url = "{url}"
model = "smollm2"
api_key_file = "teacher.key"
attach_image = {str(attach_image).lower()}
questions_per_image = 2
max_tokens = 48
temperature = 0.0
min_answer_chars = 10
{extra}
""")
    return recipe


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, teacher) -> Path:
    root = tmp_path_factory.mktemp("distill")
    make_records(root / "data")
    write_recipe(root, teacher)
    return root


@pytest.mark.slow
def test_distill_writes_stage2_records_and_caches_every_answer(workspace, teacher):
    recipe = load_recipe(workspace / "recipe.toml")
    out = workspace / "stage2.jsonl"
    tally = run_distill(recipe, out, progress=False)
    assert (tally.questions, tally.asked, tally.cached) == (6, 6, 0)  # 3 images x 2 questions
    assert tally.prompt_tokens > 6 * 100 and 0 < tally.completion_tokens <= 6 * 48
    assert tally.kept + tally.unanswered == 6 and tally.kept >= 3, tally.summary()

    records = read_records(out)  # validates every line and every image
    assert [r.image.name for r in records] == ["scratch_1.png", "crack_2.png", "good_3.png"]
    assert [r.labels for r in records] == [["scratch"], ["crack"], []]
    assert sum(len(r.qa) for r in records) == tally.kept
    for record in records:
        for qa in record.qa:
            assert qa.perspective in PERSPECTIVES and len(qa.answer) >= 10
            if qa.perspective == "what_where" and record.labels:
                assert record.labels[0] in qa.answer.lower()
    cache_lines = (workspace / "stage2.cache.jsonl").read_text().splitlines()
    assert len(cache_lines) == 6 and API_KEY not in "".join(cache_lines)

    first = out.read_bytes()
    client = make_client(recipe.distill)
    again = run_distill(recipe, out, client=client, progress=False)
    assert (again.asked, again.cached, client.stats.requests) == (0, 6, 0)
    assert again.cached_prompt_tokens == tally.prompt_tokens
    assert out.read_bytes() == first


@pytest.mark.slow
def test_killed_run_resumes_without_paying_twice(workspace, teacher):
    """SIGKILL a real ``appliance distill`` after its first paid answer; the re-run pays only
    for the rest (its own cache file, so nothing comes from the other tests)."""
    out = workspace / "killed.jsonl"
    cache = workspace / "killed.cache.jsonl"
    recipe_path = str(workspace / "recipe.toml")
    command = [sys.executable, "-m", "appliance", "distill", "--recipe", recipe_path,
               "--out", str(out), "--limit", "2"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, start_new_session=True)

    def complete_lines() -> int:
        return cache.read_bytes().count(b"\n") if cache.exists() else 0

    assert wait_for(lambda: complete_lines() >= 1 or process.poll() is not None, timeout=120)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "finished before the kill: make the run longer"
    assert not out.exists()  # the output is only written whole, at the end
    paid = complete_lines()
    assert 1 <= paid < 4

    tally = run_distill(load_recipe(recipe_path), out, limit=2, progress=False)
    assert (tally.questions, tally.cached, tally.asked) == (4, paid, 4 - paid)
    assert len(AnswerCache(cache).entries) == 4
    assert [r.image.name for r in read_records(out)] == ["scratch_1.png", "crack_2.png"]


@pytest.mark.slow
def test_cli_distill_from_cache_and_limit(workspace, teacher, capsys):
    from appliance.cli import main

    out = workspace / "stage2.jsonl"
    code = main(["distill", "--recipe", str(workspace / "recipe.toml"), "--out", str(out),
                 "--limit", "1"])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "0 teacher requests, 2 from cache" in printed.out
    assert "distill 2/2 (100%)" in printed.err
    assert len(read_records(out)) == 1


def test_cli_without_distill_section(tmp_path, capsys):
    from appliance.cli import main

    make_records(tmp_path / "data")
    (tmp_path / "recipe.toml").write_text('[data]\npath = "data/records.jsonl"\nlabels = ["x"]\n')
    code = main(
        ["distill", "--recipe", str(tmp_path / "recipe.toml"), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert "no [distill] section" in capsys.readouterr().err


def test_unknown_distill_key_is_an_error(tmp_path):
    recipe = write_recipe(tmp_path, "http://127.0.0.1:1/v1", extra="temprature = 0.5")
    with pytest.raises(ValueError, match="distill.temprature: Extra inputs are not permitted"):
        load_recipe(recipe)


@pytest.mark.slow
def test_wrong_path_and_wrong_key_are_clear_errors(teacher):
    messages = [{"role": "user", "content": "hi"}]
    no_retry = dict(max_retries=3, sleep=lambda s: pytest.fail("4xx must not be retried"))
    wrong_path = ChatClient(teacher.replace("/v1", "/v2"), "smollm2", api_key=API_KEY, **no_retry)
    with pytest.raises(TeacherError, match="HTTP 404.*must be the API root that ends in /v1"):
        wrong_path.chat(messages, max_tokens=4, temperature=0)
    assert wrong_path.stats.requests == 1
    wrong_key = ChatClient(teacher, "smollm2", api_key="wrong-key-4711", **no_retry)
    with pytest.raises(TeacherError, match="HTTP 401.*check api_key_file") as info:
        wrong_key.chat(messages, max_tokens=4, temperature=0)
    assert "wrong-key-4711" not in str(info.value) and info.value.status == 401


@pytest.mark.slow
def test_text_only_teacher_rejects_images_with_a_hint(tmp_path, teacher):
    make_records(tmp_path / "data")
    recipe = load_recipe(
        write_recipe(tmp_path, teacher, attach_image=True, extra="max_retries = 0")
    )
    with pytest.raises(TeacherError, match="HTTP 500.*set attach_image = false"):
        run_distill(recipe, tmp_path / "out.jsonl", limit=1, progress=False)
    assert not (tmp_path / "out.cache.jsonl").exists()
