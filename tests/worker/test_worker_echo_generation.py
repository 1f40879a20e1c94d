"""What the echo backend answers: chat messages, token streams, token counts, the token rate.

Real backend processes (``python -m worker.backends.echo``) on loopback, called over gRPC as a
frontend calls them; the parsing of the settings is also checked in-process.
"""

import time

import grpc
import pytest

from proto import backend_pb2
from tests.worker.conftest import AUTH, backend_stub
from worker.backends.echo import EchoSettings, embed, tokenize

CHAT = [
    backend_pb2.Message(role="system", content="You are terse."),
    backend_pb2.Message(role="user", content="first question here"),
    backend_pb2.Message(role="assistant", content="an answer"),
    backend_pb2.Message(role="user", content="Say  hello\nto the  gateway"),
]
CHAT_WORDS = 3 + 3 + 2 + 5


def loaded(echo_backend, *options: str, model: str = "tiny", **env: str):
    address, _ = echo_backend(**env)
    stub = backend_stub(address)
    result = stub.LoadModel(backend_pb2.ModelOptions(Model=model, Options=list(options)), metadata=AUTH, timeout=10)
    assert result.success, result.message
    return stub


def chat(**fields) -> backend_pb2.PredictOptions:
    return backend_pb2.PredictOptions(Messages=CHAT, UseTokenizerTemplate=True, ModelIdentity="tiny", **fields)


def test_a_chat_is_answered_with_the_last_user_message_and_counts_every_message(echo_backend):
    stub = loaded(echo_backend)

    reply = stub.Predict(chat(), metadata=AUTH, timeout=5)
    assert reply.message.decode() == "Say  hello\nto the  gateway"  # exactly, whitespace included
    assert (reply.tokens, reply.prompt_tokens) == (5, CHAT_WORDS)

    chunks = list(stub.PredictStream(chat(), metadata=AUTH, timeout=5))
    assert [c.message.decode() for c in chunks] == ["Say", "  hello", "\nto", " the", "  gateway"]
    assert [c.tokens for c in chunks] == [1, 2, 3, 4, 5]  # generated so far: the last is the total
    assert {c.prompt_tokens for c in chunks} == {CHAT_WORDS}


def test_without_a_user_message_the_last_message_is_echoed(echo_backend):
    stub = loaded(echo_backend)
    request = backend_pb2.PredictOptions(
        Messages=[backend_pb2.Message(role="system", content="only a system prompt")], UseTokenizerTemplate=True
    )
    assert stub.Predict(request, metadata=AUTH, timeout=5).message == b"only a system prompt"


def test_messages_without_the_tokenizer_template_flag_are_ignored_like_llama_cpp_does(echo_backend):
    stub = loaded(echo_backend)
    request = backend_pb2.PredictOptions(Prompt="templated by the frontend", Messages=CHAT)
    reply = stub.Predict(request, metadata=AUTH, timeout=5)
    assert (reply.message, reply.tokens, reply.prompt_tokens) == (b"templated by the frontend", 4, 4)


def test_a_prompt_streams_one_reply_per_whitespace_token(echo_backend):
    stub = loaded(echo_backend)
    text = "  The quick  brown fox\tjumps \n"
    chunks = list(stub.PredictStream(backend_pb2.PredictOptions(Prompt=text), metadata=AUTH, timeout=5))
    assert (
        [c.message.decode() for c in chunks] == tokenize(text) == ["  The", " quick", "  brown", " fox", "\tjumps \n"]
    )
    assert b"".join(c.message for c in chunks).decode() == text
    assert [(c.tokens, c.prompt_tokens) for c in chunks] == [(i, 5) for i in range(1, 6)]


def test_tokens_caps_the_answer_like_max_tokens(echo_backend):
    stub = loaded(echo_backend)
    reply = stub.Predict(chat(Tokens=2), metadata=AUTH, timeout=5)
    assert (reply.message, reply.tokens, reply.prompt_tokens) == (b"Say  hello", 2, CHAT_WORDS)
    chunks = list(stub.PredictStream(chat(Tokens=3), metadata=AUTH, timeout=5))
    assert [(c.message, c.tokens) for c in chunks] == [(b"Say", 1), (b"  hello", 2), (b"\nto", 3)]


def test_an_empty_answer_streams_one_empty_reply_carrying_the_prompt_count(echo_backend):
    stub = loaded(echo_backend)
    request = backend_pb2.PredictOptions(
        Messages=[backend_pb2.Message(role="user", content="   ")], UseTokenizerTemplate=True
    )
    chunks = list(stub.PredictStream(request, metadata=AUTH, timeout=5))
    assert [(c.message, c.tokens, c.prompt_tokens) for c in chunks] == [(b"", 0, 0)]
    reply = stub.Predict(backend_pb2.PredictOptions(Prompt=""), metadata=AUTH, timeout=5)
    assert (reply.message, reply.tokens, reply.prompt_tokens) == (b"", 0, 0)


def test_chat_requests_obey_the_model_identity_and_the_load(echo_backend):
    address, _ = echo_backend()
    stub = backend_stub(address)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.PredictStream(chat(), metadata=AUTH, timeout=5))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # READY, but nothing loaded

    assert stub.LoadModel(backend_pb2.ModelOptions(Model="other"), metadata=AUTH, timeout=10).success
    with pytest.raises(grpc.RpcError) as info:
        list(stub.PredictStream(chat(), metadata=AUTH, timeout=5))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "model identity mismatch: loaded 'other', requested 'tiny'"


def test_embeddings_are_deterministic_and_report_their_size_and_words(echo_backend):
    stub = loaded(echo_backend)
    first = stub.Embedding(backend_pb2.PredictOptions(Embeddings="a b c"), metadata=AUTH, timeout=5)
    again = stub.Embedding(backend_pb2.PredictOptions(Embeddings="a b c"), metadata=AUTH, timeout=5)
    other = stub.Embedding(backend_pb2.PredictOptions(Prompt="a b d"), metadata=AUTH, timeout=5)
    assert list(first.embeddings) == list(again.embeddings) == pytest.approx(embed("a b c"))
    assert list(other.embeddings) == pytest.approx(embed("a b d")) != pytest.approx(embed("a b c"))
    assert (first.dim, first.prompt_tokens) == (8, 3)

    tokens = stub.Embedding(backend_pb2.PredictOptions(EmbeddingTokens=[5, 7, 9]), metadata=AUTH, timeout=5)
    assert list(tokens.embeddings) == pytest.approx(embed("5 7 9"))
    assert (tokens.dim, tokens.prompt_tokens) == (8, 3)


# ----- the token rate ---------------------------------------------------------------------------


def test_the_rate_comes_from_the_environment_and_a_load_option_overrides_it():
    defaults = EchoSettings.from_env({"ECHO_TOKENS_PER_SECOND": "250"})
    assert defaults.tokens_per_second == 250
    assert EchoSettings.from_env({}).tokens_per_second == 0  # unset: unthrottled
    assert defaults.with_options(["echo.tokens_per_second=12.5"]).tokens_per_second == 12.5
    assert defaults.with_options(["echo.tokens_per_second:0"]).tokens_per_second == 0
    assert defaults.with_options(["other=1"]).tokens_per_second == 250
    with pytest.raises(ValueError):
        EchoSettings.from_env({"ECHO_TOKENS_PER_SECOND": "-1"})


@pytest.mark.parametrize("rate", ["-5", "fast"])
def test_a_bad_rate_fails_the_load(echo_backend, rate):
    address, _ = echo_backend()
    stub = backend_stub(address)
    options = backend_pb2.ModelOptions(Model="m", Options=[f"echo.tokens_per_second={rate}"])
    result = stub.LoadModel(options, metadata=AUTH, timeout=10)
    assert not result.success
    assert result.message.startswith("bad echo option")


def paced(stub, request) -> tuple[float, list]:
    started = time.monotonic()
    chunks = list(stub.PredictStream(request, metadata=AUTH, timeout=30))
    return time.monotonic() - started, chunks


def test_a_throttled_stream_takes_at_least_one_interval_per_token(echo_backend):
    # Lower bounds only (sleeps cannot end early; a loaded machine only adds time): the rate of
    # the load option, then the environment's rate when the load sets none.
    stub = loaded(echo_backend, "echo.tokens_per_second=40")
    elapsed, chunks = paced(stub, backend_pb2.PredictOptions(Prompt=" ".join(["w"] * 10)))
    assert len(chunks) == 10 and elapsed >= 10 / 40

    stub = loaded(echo_backend, ECHO_TOKENS_PER_SECOND="25")
    elapsed, chunks = paced(stub, chat())
    assert len(chunks) == 5 and elapsed >= 5 / 25
    started = time.monotonic()
    assert stub.Predict(chat(), metadata=AUTH, timeout=30).tokens == 5
    assert time.monotonic() - started >= 5 / 25  # Predict generates at the same rate


def test_a_cancelled_throttled_stream_frees_the_only_thread_at_once(echo_backend):
    # One gRPC thread and a token every 4 s: had the backend slept through its wait for the
    # second token after the client left (gRPC drops a cancelled stream only at its next
    # token), the Health call would wait behind it and run out of time.
    stub = loaded(echo_backend, "echo.tokens_per_second=0.25")
    stream = stub.PredictStream(backend_pb2.PredictOptions(Prompt="w w w"), metadata=AUTH, timeout=60)
    assert next(stream).tokens == 1
    stream.cancel()
    assert stub.Health(backend_pb2.HealthMessage(), metadata=AUTH, timeout=3).message == b"OK"


def test_more_grpc_threads_serve_calls_side_by_side(echo_backend):
    # PYTHON_GRPC_MAX_WORKERS (LocalAI's variable): a second call is served while a stream runs.
    stub = loaded(echo_backend, "echo.tokens_per_second=1", PYTHON_GRPC_MAX_WORKERS="4")
    stream = stub.PredictStream(backend_pb2.PredictOptions(Prompt=" ".join(["w"] * 600)), metadata=AUTH, timeout=900)
    try:
        assert next(stream).tokens == 1
        other = stub.PredictStream(backend_pb2.PredictOptions(Prompt="x"), metadata=AUTH, timeout=10)
        assert [c.message for c in other] == [b"x"]
    finally:
        stream.cancel()
