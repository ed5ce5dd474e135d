"""Teacher distillation: the stage-2 data set (seed 000, section III-C), ``appliance distill``.

For every training image, ``train.prompts.sample_questions`` picks questions from the five
perspectives; a teacher chat model (``train.chat_client``, any OpenAI-compatible endpoint) answers
each one, seeing the image as a ``data:`` URL part (``attach_image``) and the ground-truth labels
and boxes in text, so its answers agree with the annotations. Valid answers become the records'
``qa`` pairs, which ``train.sft`` stage ``knowledge`` trains on.

Paid answers go to a JSON-lines cache, one line each, appended and fsynced before the next request:
the key is the sha256 of (model, messages, sampling parameters), so a re-run or a run resumed after
a kill never pays twice for the same question; a line cut short by the kill is ignored. The cache
holds raw answers and validity is re-judged on every run, so changing the rules costs nothing.
The output is written atomically at the end (the old file or the new one, never half of it).

Answer rules (``answer_problem``), applied after ``clean_answer`` strips a ``<think>`` block and
cuts an answer stopped by ``max_tokens`` back to its last complete sentence:

1. not empty, and between ``min_answer_chars`` and ``max_answer_chars`` characters;
2. not a refusal ("I'm sorry", "I cannot", "as an AI", "unable to see the image", ...);
3. no mention of the annotations ("ground truth", "annotation", "bounding box"): the student
   model sees only the image, so the answer must read as if taken from the picture;
4. from the what-and-where perspective, it names every defect label of the image.

A text-only teacher (llama.cpp's server on SmolLM2 answers an image part with HTTP 500) needs
``attach_image = false``; it then answers from the labels and boxes alone.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from PIL import Image

from train.chat_client import ChatClient, TeacherError, read_api_key
from train.data import QA, LabelMap, Record, read_dataset, write_records
from train.prompts import Question, labels_phrase, sample_questions
from train.recipe import Distill, Recipe

log = logging.getLogger(__name__)

TEACHER_SYSTEM_PROMPT = (
    "You are a senior industrial quality inspector who teaches junior inspectors. {seeing} The "
    "listed defects were confirmed by an inspector and are correct. Answer the question about "
    "this part in 2 to 5 plain sentences, as an expert would: be specific about appearance, "
    "location on the part (in words such as 'upper left'), causes, risk or actions, as the "
    "question asks, and stay consistent with the listed defects. Write as if you read everything "
    "from the picture: never mention annotations, ground truth or bounding boxes. If the part "
    "has no defect, say so."
)
SEEING = {
    True: "You see a picture of a manufactured part and the defects found on it.",
    False: "You cannot see the picture of the part; you get the defects found on it in words.",
}
PERSPECTIVE_WORDS = {
    "what_where": "what and where",
    "causes": "causes",
    "urgency": "urgency and risk",
    "repair": "repair and maintenance",
    "prevention": "prevention and monitoring",
}
REFUSALS = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i can(?:not|'t)|i am unable|i'm unable|"
    r"as an ai|as a language model|unable to (?:see|view|analy[sz]e|access)|"
    r"(?:can ?not|can't|don't|do not) (?:see|view|access) (?:the |this |any )?(?:image|picture))",
    re.IGNORECASE,
)
LEAKS = re.compile(r"\b(ground[- ]?truth|annotat\w*|bounding box\w*)", re.IGNORECASE)
THINK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
IMAGE_MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
}


# --- prompts (pure) ---------------------------------------------------------------------------


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(float(value), 1)


def defect_lines(record: Record) -> list[str]:
    """The ground truth in words: one line per object, or one line saying there is none."""
    if not record.objects:
        return ["- none: the part has no defect."]
    lines = []
    for obj in record.objects:
        box = ", ".join(str(_number(v)) for v in obj.bbox)
        attrs = ", ".join(f"{k}: {v}" for k, v in sorted(obj.attributes.items()))
        lines.append(
            f"- {obj.label.replace('_', ' ')} at [{box}]" + (f" ({attrs})" if attrs else "")
        )
    return lines


def teacher_user_text(record: Record, question: Question) -> str:
    return "\n".join(
        [
            f"Image of a part, {record.width} x {record.height} pixels. Confirmed defects "
            "(boxes are [x1, y1, x2, y2] in pixels, origin at the top-left corner):",
            *defect_lines(record),
            "",
            f"Question ({PERSPECTIVE_WORDS.get(question.perspective, question.perspective)}): "
            f"{question.text}",
        ]
    )


def teacher_messages(record: Record, question: Question, image_url: str | None) -> list[dict]:
    """The chat sent to the teacher; with ``image_url`` the user turn carries the image part."""
    system = TEACHER_SYSTEM_PROMPT.format(seeing=SEEING[image_url is not None])
    text = teacher_user_text(record, question)
    if image_url is None:
        user: str | list[dict] = text
    else:
        user = [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": image_url}},
        ]
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def image_data_url(path: Path) -> str:
    """The image file as a ``data:`` URL (PNG, JPEG and WebP as they are, others as PNG)."""
    mime = IMAGE_MIME.get(path.suffix.lower())
    if mime is not None:
        data = path.read_bytes()
    else:
        buffer = io.BytesIO()
        with Image.open(path) as img:
            img.convert("RGB").save(buffer, format="PNG")
        mime, data = "image/png", buffer.getvalue()
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def cache_key(model: str, messages: list[dict], params: dict) -> str:
    """sha256 of what decides the answer: the model, the messages and the sampling parameters."""
    blob = json.dumps(
        {"model": model, "messages": messages, "params": params},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --- answer validation (pure) -----------------------------------------------------------------


def clean_answer(text: str, finish_reason: str | None) -> str:
    """Strip a leading ``<think>`` block; an answer cut off by ``max_tokens`` ends at its last
    complete sentence (empty when it has none)."""
    text = THINK.sub("", text).strip()
    if finish_reason == "length":
        ends = [m.end() for m in SENTENCE_END.finditer(text)]
        text = text[: ends[-1]] if ends else ""
    return text.strip()


def answer_problem(
    answer: str, perspective: str | None, labels: list[str], min_chars: int, max_chars: int
) -> str | None:
    """Why ``answer`` is not a usable teacher answer (the module's rules 1-4), or None."""
    if not answer.strip():
        return "empty (or cut off by max_tokens before the first full sentence)"
    if len(answer) < min_chars:
        return f"shorter than min_answer_chars ({len(answer)} < {min_chars})"
    if len(answer) > max_chars:
        return f"longer than max_answer_chars ({len(answer)} > {max_chars})"
    if REFUSALS.search(answer):
        return "a refusal"
    if LEAKS.search(answer):
        return "mentions the annotations"
    if perspective == "what_where":
        lowered = answer.lower()
        missing = [w for w in dict.fromkeys(labels) if w.replace("_", " ").lower() not in lowered]
        if missing:
            return f"does not name the defect(s) {labels_phrase(missing)}"
    return None


# --- cache, accounting, progress --------------------------------------------------------------


class AnswerCache:
    """Paid answers by cache key, in a JSON-lines file that only ever grows (fsync per line)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.damaged = 0
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.damaged += 1  # a line cut short by a kill: that answer is asked again
        if self.damaged:
            log.warning("%s: ignored %d damaged line(s)", self.path, self.damaged)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def add(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # finish a line cut short by a kill
                    handle.write(b"\n")
            handle.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        self.entries[entry["key"]] = entry


@dataclass
class Tally:
    """Token accounting and answer counts of one run."""

    questions: int = 0
    asked: int = 0  # teacher requests paid in this run
    cached: int = 0  # answers taken from the cache
    kept: int = 0
    unanswered: int = 0  # questions without a valid answer after every attempt
    prompt_tokens: int = 0  # paid in this run
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # paid by earlier runs
    cached_completion_tokens: int = 0
    problems: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        problems = ", ".join(f"{n}x {why}" for why, n in self.problems.most_common())
        return (
            f"{self.kept}/{self.questions} answers kept, {self.unanswered} unanswered; "
            f"{self.asked} teacher requests, {self.cached} from cache; tokens paid now "
            f"{self.prompt_tokens} prompt + {self.completion_tokens} completion, earlier "
            f"{self.cached_prompt_tokens} + {self.cached_completion_tokens}"
            + (f"; rejected: {problems}" if problems else "")
        )


def progress_text(done: int, total: int, elapsed: float, tally: Tally) -> str:
    """``distill 12/40 (30%) 0.8 q/s ETA 0:00:35 | 10 asked, 2 cached | 1234+567 tokens``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = "?"
    if rate > 0:
        left = int((total - done) / rate)
        eta = f"{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"
    percent = 100 * done // total if total else 100
    return (
        f"distill {done}/{total} ({percent}%) {rate:.2f} q/s ETA {eta} | {tally.asked} asked, "
        f"{tally.cached} cached | {tally.prompt_tokens}+{tally.completion_tokens} tokens"
    )


class ProgressLine:
    """One line, rewritten in place on a terminal; a new line every ``every_s`` elsewhere."""

    def __init__(self, total: int, stream: TextIO | None, every_s: float = 5.0):
        self.total, self.stream, self.every_s = total, stream, every_s
        self.start = self.last = time.monotonic()

    def update(self, done: int, tally: Tally) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        text = progress_text(done, self.total, now - self.start, tally)
        if self.stream.isatty():
            self.stream.write("\r" + text + ("\n" if done == self.total else ""))
        elif done == self.total or now - self.last >= self.every_s:
            self.stream.write(text + "\n")
            self.last = now
        self.stream.flush()


# --- the run ----------------------------------------------------------------------------------


def make_client(cfg: Distill) -> ChatClient:
    key = read_api_key(cfg.api_key_file) if cfg.api_key_file else None
    return ChatClient(
        cfg.base_url,
        cfg.model,
        api_key=key,
        timeout=cfg.timeout_s,
        max_retries=cfg.max_retries,
        backoff=cfg.backoff_s,
        requests_per_minute=cfg.requests_per_minute,
    )


def default_cache_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).stem + ".cache.jsonl")


def _ask(
    client: ChatClient,
    cache: AnswerCache,
    cfg: Distill,
    messages: list[dict],
    params: dict,
    tally: Tally,
) -> dict:
    """The cached answer for (messages, params), paying the teacher only on a miss."""
    key = cache_key(cfg.model, messages, params)
    entry = cache.get(key)
    if entry is not None:
        tally.cached += 1
        tally.cached_prompt_tokens += entry["prompt_tokens"]
        tally.cached_completion_tokens += entry["completion_tokens"]
        return entry
    try:
        result = client.chat(messages, **params)
    except TeacherError as exc:
        if cfg.attach_image and exc.status is not None and exc.status >= 500:
            raise TeacherError(
                f"{exc} (a text-only teacher fails on image parts: set "
                "attach_image = false in [distill])",
                exc.status,
            ) from None
        raise
    entry = {
        "key": key,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "served_by": result.model,
        "params": params,
    }
    cache.add(entry)
    tally.asked += 1
    tally.prompt_tokens += result.prompt_tokens
    tally.completion_tokens += result.completion_tokens
    return entry


def answer_question(
    client: ChatClient,
    cache: AnswerCache,
    cfg: Distill,
    record: Record,
    question: Question,
    image_url: str | None,
    tally: Tally,
) -> QA | None:
    """A valid teacher answer to ``question``, asking again with the next seed after an invalid
    one (at most ``answer_attempts`` times; once at temperature 0, where a re-ask repeats)."""
    attempts = cfg.answer_attempts if cfg.temperature > 0 else 1
    messages = teacher_messages(record, question, image_url)
    for attempt in range(attempts):
        params = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
        params["seed"] = cfg.seed + attempt
        entry = _ask(client, cache, cfg, messages, params, tally)
        answer = clean_answer(entry["text"], entry.get("finish_reason"))
        problem = answer_problem(
            answer, question.perspective, record.labels, cfg.min_answer_chars, cfg.max_answer_chars
        )
        if problem is None:
            return QA(question.text, answer, question.perspective)
        tally.problems[problem.split(" (")[0]] += 1
        log.info("%s: rejected answer (%s): %r", record.image.name, problem, answer[:80])
    return None


def load_dataset(recipe: Recipe) -> list[Record]:
    """The recipe's data set with its labels on the taxonomy (as the trainer reads it)."""
    data = recipe.data
    mapping = LabelMap(data.taxonomy, dict(data.label_map), unknown=data.unknown_labels)
    return mapping.apply(read_dataset(data.path, data.format))


def run_distill(
    recipe: Recipe,
    out: str | Path,
    *,
    questions_per_image: int | None = None,
    limit: int | None = None,
    client: ChatClient | None = None,
    progress: bool = True,
) -> Tally:
    """Distil teacher answers for the recipe's images into the records file ``out``.

    Each output record is its input record plus the valid teacher answers (questions it already
    has an answer to are not asked). Raises ``ValueError`` (no ``[distill]`` section),
    ``DataError`` or ``TeacherError``; answers paid before an error stay in the cache.
    """
    cfg = recipe.distill
    if cfg is None:
        raise ValueError(
            "the recipe has no [distill] section: add one with base_url and model "
            "(see examples/tiny/recipe.toml)"
        )
    k = questions_per_image or cfg.questions_per_image
    if k < 1 or (limit is not None and limit < 1):
        raise ValueError(f"questions per image ({k}) and limit ({limit}) must be at least 1")
    records = load_dataset(recipe)[:limit]
    plan = []
    for record in records:
        known = {qa.question for qa in record.qa}
        seed = f"{cfg.seed}:{record.image.name}"
        questions = [q for q in sample_questions(record.labels, k, seed) if q.text not in known]
        plan.append((record, questions))
    tally = Tally(questions=sum(len(q) for _, q in plan))
    client = client or make_client(cfg)
    cache = AnswerCache(cfg.cache or default_cache_path(Path(out)))
    line = ProgressLine(tally.questions, sys.stderr if progress else None)
    done, results = 0, []
    for record, questions in plan:
        image_url = image_data_url(record.image) if cfg.attach_image and questions else None
        answers = []
        for question in questions:
            qa = answer_question(client, cache, cfg, record, question, image_url, tally)
            if qa is None:
                tally.unanswered += 1
            else:
                answers.append(qa)
            done += 1
            line.update(done, tally)
        tally.kept += len(answers)
        results.append(replace(record, qa=record.qa + tuple(answers)))
    write_records(out, results)
    return tally
