"""OpenAI request bodies -> LocalAI ``PredictOptions``, and backend replies -> OpenAI answers.

Pure functions (no Django, no network): what the gateway sends a backend is decided here, the
way LocalAI's own frontend decides it (``core/backend/llm.go`` and ``options.go`` at the commit
docs/interoperability.md names):

* chat: ``Messages`` (role, content, name, tool_call_id, tool_calls, reasoning_content) with
  ``UseTokenizerTemplate`` set and ``Prompt`` empty: the backend applies the model's own chat
  template. A content given as parts keeps its text parts, concatenated (as LocalAI does).
* completions: ``Prompt`` as given, no template.
* sampling: ``temperature`` -> ``Temperature``, ``top_p`` -> ``TopP``, ``max_tokens`` (or
  ``max_completion_tokens``) -> ``Tokens``, ``stop`` -> ``StopPrompts``, ``seed`` -> ``Seed``,
  ``presence_penalty``/``frequency_penalty`` -> their namesakes, ``logprobs``/``top_logprobs``
  -> ``Logprobs``/``TopLogprobs``, ``logit_bias``/``tools``/``tool_choice`` -> their JSON text,
  and LocalAI's extensions ``top_k``, ``min_p``, ``typical_p``, ``repeat_penalty``
  (``Penalty``), ``grammar``, ``ignore_eos``. Other fields are ignored, as LocalAI ignores them.
* usage: ``Reply.prompt_tokens`` and ``Reply.tokens`` as the backend counts them; in a stream
  each reply carries the running totals (LocalAI's backends do), so the last count wins.

Bad input raises :class:`gateway.errors.GatewayError` (400, naming the field).
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import math
import struct
import time
import uuid
from dataclasses import dataclass, field

from proto import backend_pb2

from .errors import invalid

INT32_MAX = 2**31 - 1
MAX_EMBEDDING_INPUTS = 2048
FINISH_STOP, FINISH_LENGTH = "stop", "length"


# --- reading request bodies ------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise invalid(f"'{name}' must be a number.", param=name)
    if not low <= value <= high:
        raise invalid(f"'{name}' must be between {low:g} and {high:g}.", param=name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int = INT32_MAX) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid(f"'{name}' must be an integer.", param=name)
    if not low <= value <= high:
        raise invalid(f"'{name}' must be between {low} and {high}.", param=name)
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false.", param=name)
    return value


def _json_text(body: dict, name: str, kinds: tuple) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, kinds):
        raise invalid(f"'{name}' has the wrong type.", param=name)
    return value if isinstance(value, str) else json.dumps(value)


def model_name(body: dict) -> str:
    """The ``model`` of a request body (required, a non-empty string)."""
    value = body.get("model")
    if not isinstance(value, str) or not value.strip():
        raise invalid(
            "'model' is required: the name of a model (GET /v1/models lists them).", param="model", code="missing_model"
        )
    return value


@dataclass
class TextRequest:
    """A chat or completion request, mapped: what to send and how to answer."""

    kind: str  # "chat" or "completion"
    model: str
    options: backend_pb2.PredictOptions
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    max_tokens: int | None = None
    affinity_key: str | None = None  # the route's affinity key (``affinity_key``)

    @property
    def object_prefix(self) -> str:
        return "chatcmpl" if self.kind == "chat" else "cmpl"


def _sampling(body: dict) -> tuple[backend_pb2.PredictOptions, int | None]:
    options = backend_pb2.PredictOptions()
    floats = {
        "temperature": ("Temperature", 0.0, 2.0),
        "top_p": ("TopP", 0.0, 1.0),
        "min_p": ("MinP", 0.0, 1.0),
        "typical_p": ("TypicalP", 0.0, 1.0),
        "presence_penalty": ("PresencePenalty", -2.0, 2.0),
        "frequency_penalty": ("FrequencyPenalty", -2.0, 2.0),
        "repeat_penalty": ("Penalty", 0.0, 100.0),
    }
    for name, (target, low, high) in floats.items():
        value = _number(body, name, low, high)
        if value is not None:
            setattr(options, target, value)
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    if max_tokens is not None:
        options.Tokens = max_tokens
    for name, target, low in (("top_k", "TopK", 0), ("seed", "Seed", -(2**31))):
        value = _integer(body, name, low)
        if value is not None:
            setattr(options, target, value)
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise invalid("Only one choice per request is served ('n' must be 1).", param="n", code="unsupported_value")
    stop = body.get("stop")
    if isinstance(stop, str):
        options.StopPrompts.append(stop)
    elif isinstance(stop, list) and all(isinstance(item, str) for item in stop):
        options.StopPrompts.extend(stop)
    elif stop is not None:
        raise invalid("'stop' must be a string or a list of strings.", param="stop")
    if isinstance(body.get("logprobs"), bool):
        options.Logprobs = 1 if body["logprobs"] else 0
    else:
        options.Logprobs = _integer(body, "logprobs", 0, 20) or 0
    options.TopLogprobs = _integer(body, "top_logprobs", 0, 20) or 0
    options.LogitBias = _json_text(body, "logit_bias", (dict,))
    options.Tools = _json_text(body, "tools", (list,))
    options.ToolChoice = _json_text(body, "tool_choice", (str, dict))
    grammar = body.get("grammar")
    if grammar is not None:
        if not isinstance(grammar, str):
            raise invalid("'grammar' must be a string.", param="grammar")
        options.Grammar = grammar
    options.IgnoreEOS = _boolean(body, "ignore_eos")
    return options, max_tokens


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _boolean(body, "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise invalid("'stream_options' must be an object.", param="stream_options")
    return stream, stream and _boolean(stream_options, "include_usage")


def _message(index: int, raw) -> backend_pb2.Message:
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise invalid(f"'{where}' must be an object with 'role' and 'content'.", param=where)
    role = raw.get("role")
    if not isinstance(role, str) or not role:
        raise invalid(f"'{where}.role' must be a non-empty string.", param=f"{where}.role")
    message = backend_pb2.Message(role=role, content=_content(raw.get("content"), f"{where}.content"))
    for name in ("name", "tool_call_id", "reasoning_content"):
        value = raw.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise invalid(f"'{where}.{name}' must be a string.", param=f"{where}.{name}")
            setattr(message, name, value)
    if raw.get("tool_calls") is not None:
        if not isinstance(raw["tool_calls"], list):
            raise invalid(f"'{where}.tool_calls' must be a list.", param=f"{where}.tool_calls")
        message.tool_calls = json.dumps(raw["tool_calls"])
    return message


def _content(value, where: str) -> str:
    """A message's content as text: a string, null, or parts whose text parts are joined
    (LocalAI's tokenizer-template path keeps only the text of multimodal content)."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        texts = []
        for position, part in enumerate(value):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid(f"'{where}[{position}]' must be a content part object.", param=where)
            if part["type"] != "text":
                raise invalid(
                    f"'{where}[{position}]': content parts of type {part['type']!r} are not served; only text.",
                    param=where,
                    code="unsupported_value",
                )
            if not isinstance(part.get("text"), str):
                raise invalid(f"'{where}[{position}].text' must be a string.", param=where)
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"'{where}' must be a string or a list of content parts.", param=where)


def affinity_key(body: dict, text: str, prefix_chars: int) -> str | None:
    """The key a chat or completion request routes by (``registry.affinity``): the OpenAI
    ``user`` field (an end user's id, the closest thing to a session the API carries) when it is
    a non-empty string, else the first ``prefix_chars`` characters of the conversation or prompt
    (``text``), so requests sharing that prefix (a session's later turns, a shared system
    prompt) prefer the replica that has it in its prompt cache; None when neither applies.
    Hashed: the key has a bounded length and carries nothing of the prompt."""
    user = body.get("user")
    if isinstance(user, str) and user:
        return "user:" + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    if prefix_chars <= 0 or not text:
        return None
    prefix = text[:prefix_chars].encode("utf-8", "surrogatepass")
    return "prefix:" + hashlib.sha256(prefix).hexdigest()[:32]


def _conversation(options: backend_pb2.PredictOptions) -> str:
    """The messages as one text, each as role and content with separators no content can fake
    (a record separator between fields, a group separator between messages)."""
    return "\x1d".join(f"{message.role}\x1e{message.content}" for message in options.Messages)


def chat_request(body: dict, *, prefix_chars: int = 0) -> TextRequest:
    """POST /v1/chat/completions: messages passed as LocalAI passes them."""
    model = model_name(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list.", param="messages")
    options, max_tokens = _sampling(body)
    options.Messages.extend(_message(index, raw) for index, raw in enumerate(messages))
    options.UseTokenizerTemplate = True
    stream, include_usage = _stream_flags(body)
    key = affinity_key(body, _conversation(options), prefix_chars)
    return TextRequest("chat", model, options, stream, include_usage, max_tokens, key)


def completion_request(body: dict, *, prefix_chars: int = 0) -> TextRequest:
    """POST /v1/completions: the prompt as given (one prompt per request)."""
    model = model_name(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("'prompt' must be a string (one prompt per request).", param="prompt")
    options, max_tokens = _sampling(body)
    options.Prompt = prompt
    stream, include_usage = _stream_flags(body)
    return TextRequest(
        "completion", model, options, stream, include_usage, max_tokens, affinity_key(body, prompt, prefix_chars)
    )


@dataclass
class EmbeddingRequest:
    model: str
    inputs: list[backend_pb2.PredictOptions]  # one Embedding call each, in order
    base64: bool = False


def embedding_request(body: dict) -> EmbeddingRequest:
    """POST /v1/embeddings: ``input`` as a string, strings, tokens or lists of tokens (tokens go
    in ``EmbeddingTokens``); ``encoding_format`` ``float`` or ``base64``."""
    model = model_name(body)
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_is_int(t) for t in raw)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise invalid("'input' must be a string, a list of strings or a list of token lists.", param="input")
    if len(raw) > MAX_EMBEDDING_INPUTS:
        raise invalid(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} items.", param="input")
    inputs = []
    for item in raw:
        if isinstance(item, str):
            inputs.append(backend_pb2.PredictOptions(Embeddings=item))
        elif isinstance(item, list) and item and all(_is_int(t) and 0 <= t <= INT32_MAX for t in item):
            inputs.append(backend_pb2.PredictOptions(EmbeddingTokens=item))
        else:
            raise invalid("each 'input' item must be a string or a non-empty list of tokens.", param="input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise invalid("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    return EmbeddingRequest(model, inputs, encoding == "base64")


# --- answers -----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_seconds() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Tally:
    """Text and token counts of one generation, fed reply by reply. Counts are the backend's
    (the last reply's running totals); a stream whose backend counts nothing counts its
    non-empty chunks. Text is decoded as UTF-8 across replies (a character split between two
    replies is held back until complete, as LocalAI does)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )

    def add(self, reply: backend_pb2.Reply) -> str:
        """The new text of ``reply`` (maybe empty); updates the counts."""
        if reply.prompt_tokens > 0:
            self.prompt_tokens = reply.prompt_tokens
        if reply.tokens > 0:
            self.completion_tokens = reply.tokens
        raw = reply.message or b"".join(delta.content.encode("utf-8") for delta in reply.chat_deltas)
        text = self._decoder.decode(raw)
        if text:
            self.chunks += 1
        return text

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)

    @property
    def completion(self) -> int:
        return self.completion_tokens or self.chunks

    def finish_reason(self, max_tokens: int | None) -> str:
        return FINISH_LENGTH if max_tokens is not None and self.completion_tokens >= max_tokens else FINISH_STOP


def text_answer(request: TextRequest, answer_id: str, created: int, text: str, tally: Tally) -> dict:
    """The non-streamed answer (``chat.completion`` or ``text_completion``)."""
    finish = tally.finish_reason(request.max_tokens)
    if request.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    return {
        "id": answer_id,
        "object": kind,
        "created": created,
        "model": request.model,
        "choices": [choice],
        "usage": usage(tally.prompt_tokens, tally.completion),
    }


def text_chunk(
    request: TextRequest, answer_id: str, created: int, text: str | None, finish: str | None, *, first: bool = False
) -> dict:
    """One streamed chunk (``chat.completion.chunk`` or ``text_completion``)."""
    if request.kind == "chat":
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    return {"id": answer_id, "object": kind, "created": created, "model": request.model, "choices": [choice]}


_SLOT = "\u0000text\u0000"


def chunk_frame(request: TextRequest, answer_id: str, created: int) -> tuple[str, str]:
    """``(before, after)``: a streamed text chunk's server-sent event is ``before +
    json.dumps(text) + after``, the same document :func:`text_chunk` makes, without building and
    encoding a dict for every token."""
    document = json.dumps(text_chunk(request, answer_id, created, _SLOT, None), separators=(",", ":"))
    before, after = document.split(json.dumps(_SLOT))
    return "data: " + before, after + "\n\n"


def event(document: dict) -> str:
    """One server-sent event ``data: <json>\\n\\n``."""
    return "data: " + json.dumps(document, separators=(",", ":")) + "\n\n"


def usage_chunk(request: TextRequest, answer_id: str, created: int, tally: Tally) -> dict:
    """The last chunk of a stream asked with ``stream_options.include_usage``: no choices."""
    kind = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
    return {
        "id": answer_id,
        "object": kind,
        "created": created,
        "model": request.model,
        "choices": [],
        "usage": usage(tally.prompt_tokens, tally.completion),
    }


def embedding_answer(request: EmbeddingRequest, results: list[backend_pb2.EmbeddingResult]) -> dict:
    data, prompt_tokens = [], 0
    for index, result in enumerate(results):
        vector = list(result.embeddings)
        if request.base64:
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        else:
            data.append({"object": "embedding", "index": index, "embedding": vector})
        prompt_tokens += result.prompt_tokens or result.tokens
    return {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def model_entry(name: str, created: int, **extra) -> dict:
    """One item of GET /v1/models (OpenAI's ``model`` object, plus the fleet's counts)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "controlplane", **extra}
