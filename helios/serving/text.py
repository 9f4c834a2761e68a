"""Text in and out of the engine: prompt encoding (with a pre-check that needs no tokenizer call), chat templates,
incremental detokenisation for streams and stop strings, and logprob rendering.

    python -c "from helios.serving.text import held_back; print(held_back('abc ST', ['STOP']))"   # 2

Everything here runs per request and may raise for one request's input (a lone surrogate, a template that rejects
the messages): callers turn those exceptions into that request's 400, never the batch's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from helios.sampling import TokenLogprob

RenderedLogprobs = list[tuple[str, float, list[tuple[str, float]]]]


def max_chars_per_token(tokenizer: Any) -> int:
    """Most characters any single token of `tokenizer` stands for (its own string or its decode, whichever is
    longer): a prompt of c characters needs at least ceil(c / this) tokens. About 1 s for a 49k vocabulary: the
    server computes it once per loaded arm."""
    ids = list(range(len(tokenizer)))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    decoded = tokenizer.batch_decode([[i] for i in ids])
    longest = max(max(len(p or "") for p in pieces), max(len(d) for d in decoded))
    return max(int(longest), 1)


def min_prompt_tokens(chars: int, chars_per_token: int) -> int:
    """A lower bound of a prompt's token count from its length alone, so that a prompt that cannot fit the context
    window is rejected without tokenizing it. Assumes the tokenizer's normaliser deletes no characters (true of the
    byte-level BPE and SentencePiece tokenizers of the candidates; a normaliser that strips characters would make this
    bound reject prompts that would have fitted)."""
    return math.ceil(chars / chars_per_token)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Chat prompt ids: the tokenizer's template when it has one, else a plain "role: content" transcript (the tiny
    test models' byte tokenizer has no template)."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could still turn out to begin a stop string (not sent yet)."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


@dataclasses.dataclass
class TextStream:
    """Incremental detokenisation of one sequence, fed one token at a time from the decode loop.

    Sends only text that is final: never the tail of a character whose bytes are still coming, nor text that may
    begin a stop string; stops at EOS, at a stop string or after `max_tokens`. What it sends is always a prefix of
    the request's final text (checked before each send), so the chunks concatenate to the non-streamed answer.
    `push` returns the new piece ("" if none); `done` turns True when a stop string (or EOS, or max_tokens) ended it.
    """

    tokenizer: Any
    eos: frozenset[int]
    stop: list[str]
    max_tokens: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""  # decoded text of tokens[:read_offset]
    # Decode window (vLLM's incremental detokenisation): only tokens[prefix_offset:] are decoded per token, the
    # tokens before read_offset giving the context that spacing depends on. Decoding the whole prefix instead would
    # cost O(n^2) per stream inside the decode loop.
    prefix_offset: int = 0
    read_offset: int = 0
    sent: str = ""
    done: bool = False
    stopped: bool = False  # a stop string ended it (the engine must stop this sequence)

    def push(self, token: int) -> str:
        if self.done:
            return ""
        if token in self.eos or len(self.tokens) >= self.max_tokens:
            self.done = True
            return ""
        self.tokens.append(token)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix_offset: self.read_offset], skip_special_tokens=True)
        window = decode(self.tokens[self.prefix_offset:], skip_special_tokens=True)
        if window.endswith("\ufffd") or len(window) <= len(before):
            return ""  # an incomplete character (or no text yet): wait for the next tokens
        self.text += window[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        text = self.text
        for stop in self.stop:
            cut = text.find(stop, max(0, len(self.sent) - len(stop)))  # sent text holds no stop string
            if cut >= 0:
                text, self.done, self.stopped = text[:cut], True, True
        if not self.done:
            text = text[: len(text) - held_back(text, self.stop)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def rest(self, final_text: str) -> str:
        """What is left to send of the final text once decoding has ended."""
        return final_text[len(self.sent):] if final_text.startswith(self.sent) else ""


def final_text(tokenizer: Any, tokens: list[int], stop: list[str]) -> tuple[str, bool]:
    """The decoded text of `tokens` cut at the first stop string, and whether a stop string cut it."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cut_by_stop = False
    for s in stop:
        cut = text.find(s)
        if cut >= 0:
            text, cut_by_stop = text[:cut], True
    return text, cut_by_stop


def kept_tokens(tokenizer: Any, tokens: list[int], text: str) -> int:
    """How many leading tokens it takes to produce `text` (a stop-string cut of their decode): the shortest prefix
    whose decode starts with it (a prefix that ends inside a multi-byte character decodes to U+FFFD there, so it does
    not count). Binary search, so only O(log n) decodes."""
    low, high = 0, len(tokens)
    while low < high:
        mid = (low + high) // 2
        if tokenizer.decode(tokens[:mid], skip_special_tokens=True).startswith(text):
            high = mid
        else:
            low = mid + 1
    return low


def render_logprobs(tokenizer: Any, entries: list[TokenLogprob]) -> RenderedLogprobs:
    """Token ids as text, one token at a time (as vLLM reports them: a byte of a multi-byte character decodes to
    U+FFFD on its own)."""
    def text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    return [(text(e.token_id), e.logprob, [(text(i), lp) for i, lp in e.top]) for e in entries]
