"""The narrative writer: a small instruct model on llama.cpp, decoding under the report grammar.

The model (SmolLM2-135M-Instruct by default, see ``appliance.models``) turns the facts of one
inspection into the report's ``narrative`` object. Decoding is constrained by the GBNF grammar
generated from ``narrative_schema()``, so the text is compact JSON of the right shape with bounded
strings; it is still parsed and validated before it is returned, and anything else (including an
answer cut off by ``max_tokens``) raises ``NarrativeError`` carrying the raw text.

A grammar-valid answer is bounded (summary <= 280 characters, at most 3 + 3 items of <= 140), but in
tokens it can be longer than any sensible ``max_tokens`` (a token may hold a single byte), so
``max_tokens`` bounds latency and truncation is reported as an error rather than guessed around.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from jsonschema import Draft202012Validator

from appliance.grammar import gbnf_from_schema
from appliance.prompts import narrative_messages
from appliance.schema import narrative_schema


class NarrativeError(Exception):
    """The model's answer is not a valid narrative; ``raw`` holds what it produced."""

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(f"{message}; raw answer: {raw[:400]!r}")
        self.raw = raw


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:  # the package is a runtime dependency, but built natively
        raise ImportError(
            "the narrative writer needs llama.cpp: install it with `pip install llama-cpp-python`"
        ) from error
    return llama_cpp


def llama_accepts_grammar(llm, gbnf: str) -> bool:
    """Whether llama.cpp parses ``gbnf`` against ``llm``'s vocabulary.

    llama-cpp-python does not check this itself: a grammar that fails to parse would leave the
    sampler without its constraint, so the writer checks once when it loads.
    """
    llama_cpp = _llama_cpp()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


class NarrativeWriter:
    """Writes the narrative of one inspection; loads the GGUF once and is safe to share."""

    def __init__(
        self,
        gguf_path: Path,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        seed: int = 0,
        max_tokens: int = 384,
        temperature: float = 0.0,
        repeat_penalty: float = 1.0,
    ) -> None:
        self._lib = llama_cpp = _llama_cpp()
        if not Path(gguf_path).is_file():
            raise FileNotFoundError(f"narrative model {gguf_path} does not exist")
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.repeat_penalty = repeat_penalty
        self._llm = llama_cpp.Llama(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            seed=seed,
            verbose=False,
        )
        self.gbnf = gbnf_from_schema(narrative_schema())
        if not llama_accepts_grammar(self._llm, self.gbnf):
            raise ValueError("llama.cpp refused the narrative grammar:\n" + self.gbnf)
        self._grammar = llama_cpp.LlamaGrammar.from_string(self.gbnf, verbose=False)
        self._validator = Draft202012Validator(narrative_schema())
        self._lock = threading.Lock()

    def write(
        self, facts: dict, *, temperature: float | None = None, seed: int | None = None
    ) -> tuple[dict, dict]:
        """The narrative for ``facts`` (see ``narrative_messages``) and generation stats.

        Stats: ``tokens`` generated, ``prompt_tokens``, ``ms`` wall time of the whole call,
        ``prompt_ms`` of it spent reading the prompt, ``tokens_per_s`` generated tokens per second
        of the rest (decoding, grammar and sampling).
        """
        text, finish, stats = self.generate(
            narrative_messages(facts), constrained=True, temperature=temperature, seed=seed
        )
        return self._parse(text, finish), stats

    def generate(
        self,
        messages: list[dict],
        *,
        constrained: bool = True,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> tuple[str, str, dict]:
        """Raw chat completion: (text, finish_reason, stats), with or without the grammar."""
        with self._lock:
            # No reuse of a previous prompt's KV cache: a prompt evaluated in different batches
            # gives slightly different logits, and the same facts must give the same narrative.
            self._llm.reset()
            self._lib.llama_perf_context_reset(self._llm.ctx)
            start = time.perf_counter()
            response = self._llm.create_chat_completion(
                messages=messages,
                grammar=self._grammar if constrained else None,
                max_tokens=self.max_tokens,
                temperature=self.temperature if temperature is None else temperature,
                seed=self.seed if seed is None else seed,
                repeat_penalty=self.repeat_penalty,
            )
            ms = (time.perf_counter() - start) * 1000.0
            prompt_ms = self._lib.llama_perf_context(self._llm.ctx).t_p_eval_ms
        choice, usage = response["choices"][0], response["usage"]
        tokens, generation_s = usage["completion_tokens"], max(ms - prompt_ms, 1e-3) / 1000.0
        stats = {
            "tokens": tokens,
            "prompt_tokens": usage["prompt_tokens"],
            "ms": ms,
            "prompt_ms": prompt_ms,
            "tokens_per_s": tokens / generation_s,
        }
        return choice["message"]["content"] or "", choice["finish_reason"] or "", stats

    def _parse(self, text: str, finish_reason: str) -> dict:
        if finish_reason == "length":
            raise NarrativeError(
                f"the narrative was cut off at max_tokens={self.max_tokens}; raise max_tokens", text
            )
        try:
            narrative = json.loads(text)
        except json.JSONDecodeError as error:
            raise NarrativeError(f"the narrative is not JSON ({error})", text) from error
        problems = [error.message for error in self._validator.iter_errors(narrative)]
        if problems:
            raise NarrativeError("the narrative breaks the schema: " + "; ".join(problems), text)
        return narrative

    def close(self) -> None:
        """Free the model (the writer cannot be used afterwards)."""
        with self._lock:
            self._llm.close()

    def __enter__(self) -> NarrativeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
