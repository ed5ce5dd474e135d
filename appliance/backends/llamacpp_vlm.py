"""The language half of a trained inspector on llama.cpp: image embeddings in, report tokens out.

A trained bundle's prompt is a fixed list of *segments* (see ``appliance.vlm``): token ids
(tokenised once at export, by the training tokenizer, so serving never re-tokenises the prompt
differently), learned prompt embeddings, and one image slot. The image slot receives the projected
image embeddings from the vision graph, fed to llama.cpp as an embedding batch
(``llama_batch_init(n, n_embd, 1)`` and ``batch.embd``).

Everything before the image slot is the same for every image, so it is decoded once and its KV cache
kept: for each image the cache is cut back to the end of that prefix (``llama_memory_seq_rm``), and
only the image, the prompt's tail and the answer are decoded. The split of the prompt into batches
is always the same, so the logits (and so the greedy answer) do not depend on what ran before.

Decoding is greedy under a GBNF grammar. As llama.cpp's own common sampler does, the grammar is
checked against the unconstrained argmax first and applied to the whole vocabulary only when that
token is refused, which keeps grammar cost low for large vocabularies and never changes the result.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance.backends.llamacpp import _llama_cpp

KV_TYPES = {"f32": 0, "f16": 1}  # GGML_TYPE_F32, GGML_TYPE_F16: the KV cache's element type
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class DecodeError(RuntimeError):
    """llama.cpp refused a batch or the grammar; the message says which and why."""


@dataclass
class Generation:
    """The answer to one image: ids, text, per-token log-probabilities and timings (ms)."""

    tokens: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str  # "stop" (end of generation token) or "length"
    timings_ms: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Segment:
    """One piece of the prompt: token ids, fixed embeddings (n x n_embd), or the image slot."""

    tokens: tuple[int, ...] = ()
    embeddings: np.ndarray | None = None
    image: bool = False

    @property
    def length(self) -> int:
        if self.image:
            raise ValueError("the image slot's length is the image-token count")
        return len(self.tokens) if self.embeddings is None else int(self.embeddings.shape[0])


class EmbeddingDecoder:
    """One llama.cpp context serving a fixed prompt with an image slot; thread-safe."""

    def __init__(
        self,
        gguf_path: Path,
        segments: list[Segment],
        *,
        image_tokens: int,
        gbnf: str | None,
        grammar_root: str = "root",
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        kv_cache_type: str = "f16",
    ) -> None:
        self._lib = lib = _llama_cpp()
        if kv_cache_type not in KV_TYPES:
            raise ValueError(f"kv_cache_type {kv_cache_type!r} is not one of {sorted(KV_TYPES)}")
        if not Path(gguf_path).is_file():
            raise FileNotFoundError(f"language model {gguf_path} does not exist")
        if sum(1 for s in segments if s.image) != 1:
            raise ValueError("the prompt must have exactly one image slot")
        self.segments, self.image_tokens = segments, image_tokens
        self.n_ctx, self.n_batch = n_ctx, max(512, image_tokens)
        self._llm = lib.Llama(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_batch=self.n_batch,
            n_ubatch=self.n_batch,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            type_k=KV_TYPES[kv_cache_type],
            type_v=KV_TYPES[kv_cache_type],
            verbose=False,
        )
        self.n_embd = lib.llama_model_n_embd(self._llm.model)
        self.n_vocab = self._llm.n_vocab()
        self._vocab = lib.llama_model_get_vocab(self._llm.model)
        self.gbnf, self.grammar_root = gbnf, grammar_root
        if gbnf is not None:
            probe = self._grammar()  # refuses a grammar llama.cpp cannot parse, once, at load
            lib.llama_sampler_free(probe)
        self._lock = threading.Lock()
        self._prefix_len: int | None = None
        self.image_at = next(i for i, s in enumerate(segments) if s.image)

    # -- batches ---------------------------------------------------------------------------
    def _decode(self, pos: int, *, tokens=None, embeds: np.ndarray | None = None) -> None:
        """Decode ``tokens`` or ``embeds`` at positions ``pos..`` in batches of at most
        ``n_batch`` (llama.cpp aborts on larger ones); logits for the last position only."""
        n = len(tokens) if tokens is not None else int(embeds.shape[0])
        if pos + n > self.n_ctx:
            raise DecodeError(f"{pos + n} positions exceed the context of {self.n_ctx}")
        for start in range(0, n, self.n_batch):
            stop = min(start + self.n_batch, n)
            self._decode_batch(
                pos + start,
                tokens=None if tokens is None else tokens[start:stop],
                embeds=None if embeds is None else embeds[start:stop],
            )

    def _decode_batch(self, pos: int, *, tokens=None, embeds: np.ndarray | None = None) -> None:
        lib = self._lib
        n = len(tokens) if tokens is not None else int(embeds.shape[0])
        if n == 0:
            return
        batch = lib.llama_batch_init(n, self.n_embd if embeds is not None else 0, 1)
        try:
            if embeds is not None:
                if embeds.shape[1] != self.n_embd:
                    raise DecodeError(
                        f"embeddings have width {embeds.shape[1]}, the model's is {self.n_embd}"
                    )
                data = np.ascontiguousarray(embeds, dtype=np.float32)
                ctypes.memmove(batch.embd, data.ctypes.data, data.nbytes)
            for i in range(n):
                if tokens is not None:
                    batch.token[i] = int(tokens[i])
                batch.pos[i] = pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == n - 1
            batch.n_tokens = n
            rc = lib.llama_decode(self._llm.ctx, batch)
            if rc != 0:
                raise DecodeError(f"llama_decode returned {rc} for {n} positions at {pos}")
        finally:
            lib.llama_batch_free(batch)

    def _segment(self, segment: Segment, pos: int, image: np.ndarray | None) -> int:
        if segment.image:
            self._decode(pos, embeds=image)
            return pos + int(image.shape[0])
        if segment.embeddings is not None:
            self._decode(pos, embeds=segment.embeddings)
        else:
            self._decode(pos, tokens=segment.tokens)
        return pos + segment.length

    def _last_logits(self) -> np.ndarray:
        pointer = self._lib.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    def _prefix(self) -> int:
        """Decode the prompt before the image slot once; afterwards only cut back to it."""
        memory = self._lib.llama_get_memory(self._llm.ctx)
        if self._prefix_len is None:
            self._lib.llama_memory_clear(memory, True)
            pos = 0
            for segment in self.segments[: self.image_at]:
                pos = self._segment(segment, pos, None)
            self._prefix_len = pos
        elif not self._lib.llama_memory_seq_rm(memory, 0, self._prefix_len, -1):
            raise DecodeError("llama.cpp could not cut the KV cache back to the prompt prefix")
        return self._prefix_len

    # -- sampling --------------------------------------------------------------------------
    def new_grammar(self):
        """A fresh grammar sampler (the caller frees it with ``free_grammar``)."""
        return self._grammar()

    def free_grammar(self, grammar) -> None:
        self._lib.llama_sampler_free(grammar)

    def pick(self, grammar, logits: np.ndarray) -> int:
        """The greedy token under ``grammar`` (None: plain argmax); accepts it into the grammar."""
        token = self._pick(grammar, logits)
        if grammar is not None and not self._lib.llama_vocab_is_eog(self._vocab, token):
            self._lib.llama_sampler_accept(grammar, token)
        return token

    def _grammar(self):
        sampler = self._lib.llama_sampler_init_grammar(
            self._vocab, self.gbnf.encode("utf-8"), self.grammar_root.encode()
        )
        if not sampler:
            raise DecodeError("llama.cpp refused the report grammar:\n" + self.gbnf)
        return sampler

    def _allowed(self, grammar, logits: np.ndarray, token: int | None) -> np.ndarray:
        """The logits with grammar-refused tokens at -inf (only ``token`` when given)."""
        lib = self._lib
        ids = np.arange(self.n_vocab, dtype=np.int32) if token is None else np.array([token])
        data = np.zeros(len(ids), dtype=TOKEN_DATA)  # llama_token_data: {id, logit, p}
        data["id"], data["logit"] = ids, logits[ids]
        array = lib.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)),
            size=len(ids),
            selected=-1,
            sorted=False,
        )
        lib.llama_sampler_apply(grammar, ctypes.byref(array))
        return data["logit"].copy()

    def _pick(self, grammar, logits: np.ndarray) -> int:
        best = int(np.argmax(logits))
        if grammar is None or np.isfinite(self._allowed(grammar, logits, best)[0]):
            return best
        masked = self._allowed(grammar, logits, None)
        if not np.isfinite(masked).any():
            raise DecodeError("the grammar allows no token here (the answer cannot be completed)")
        return int(np.argmax(masked))

    # -- the answer --------------------------------------------------------------------------
    def generate(
        self, image: np.ndarray, max_tokens: int, *, constrained: bool = True
    ) -> Generation:
        """Greedy answer for one image's ``image_tokens x n_embd`` embeddings."""
        if image.shape != (self.image_tokens, self.n_embd):
            raise DecodeError(
                f"image embeddings of shape {image.shape}, expected "
                f"({self.image_tokens}, {self.n_embd})"
            )
        lib = self._lib
        with self._lock:
            started = time.perf_counter()
            pos = self._prefix()
            for segment in self.segments[self.image_at :]:
                pos = self._segment(segment, pos, image)
            prefill = time.perf_counter()
            grammar = self._grammar() if constrained and self.gbnf is not None else None
            tokens, logprobs, finish = [], [], "length"
            try:
                for _ in range(max_tokens):
                    logits = self._last_logits()
                    token = self._pick(grammar, logits)
                    if lib.llama_vocab_is_eog(self._vocab, token):
                        finish = "stop"
                        break
                    if grammar is not None:
                        lib.llama_sampler_accept(grammar, token)
                    tokens.append(token)
                    logprobs.append(_log_softmax_at(logits, token))
                    self._decode(pos, tokens=[token])
                    pos += 1
            finally:
                if grammar is not None:
                    lib.llama_sampler_free(grammar)
            done = time.perf_counter()
        text = self._llm.detokenize(tokens).decode("utf-8", errors="replace")
        timings = {"prefill": (prefill - started) * 1e3, "decode": (done - prefill) * 1e3}
        return Generation(tokens, text, logprobs, finish, timings)

    def probe_logits(
        self, image: np.ndarray, continuation: list[int], timings: dict | None = None
    ) -> np.ndarray:
        """Logits after the prompt and after each continuation token ((k+1) x n_vocab): the
        parity probe that export compares with transformers. ``timings`` receives the seconds
        spent on the prompt and on the continuation (one token per decode, as in serving)."""
        with self._lock:
            started = time.perf_counter()
            pos = self._prefix()
            for segment in self.segments[self.image_at :]:
                pos = self._segment(segment, pos, image)
            rows = [self._last_logits()]
            prompted = time.perf_counter()
            for token in continuation:
                self._decode(pos, tokens=[token])
                pos += 1
                rows.append(self._last_logits())
            if timings is not None:
                timings["prompt_s"] = prompted - started
                timings["decode_s"] = time.perf_counter() - prompted
        return np.stack(rows)

    def close(self) -> None:
        with self._lock:
            self._llm.close()


def _log_softmax_at(logits: np.ndarray, token: int) -> float:
    top = float(logits.max())
    return float(logits[token] - top - np.log(np.exp(logits - top).sum()))
