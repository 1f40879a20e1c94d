"""OpenAI request bodies -> PredictOptions, and replies -> OpenAI answers (gateway/mapping.py):
pure functions, no database, no network."""

import base64
import json
import struct

import pytest

from gateway import mapping
from gateway.errors import GatewayError
from proto import backend_pb2


def refused(function, body) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        function(body)
    assert caught.value.status == 400
    return caught.value


def test_chat_messages_are_passed_as_localai_passes_them():
    request = mapping.chat_request(
        {
            "model": "llama",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
                {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "answer"},
            ],
        }
    )
    options = request.options
    assert (request.kind, request.model, request.stream) == ("chat", "llama", False)
    assert options.UseTokenizerTemplate is True
    assert options.Prompt == ""  # the backend applies the model's own chat template
    assert [(m.role, m.content) for m in options.Messages] == [
        ("system", "Be brief."),
        ("user", "hello there"),
        ("assistant", ""),
        ("tool", "42"),
    ]
    assert options.Messages[2].tool_calls == '[{"id": "c1", "type": "function"}]'
    assert (options.Messages[3].tool_call_id, options.Messages[3].name) == ("c1", "answer")
    assert options.ModelIdentity == ""  # set per lease by the handler


def test_sampling_parameters_map_to_their_predict_options_fields():
    request = mapping.completion_request(
        {
            "model": "llama",
            "prompt": ["Once upon a time"],
            "temperature": 0.7,
            "top_p": 0.9,
            "max_tokens": 32,
            "stop": ["\n", "END"],
            "seed": -5,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "top_k": 40,
            "min_p": 0.05,
            "typical_p": 0.8,
            "repeat_penalty": 1.1,
            "logprobs": 2,
            "logit_bias": {"50256": -100},
            "grammar": 'root ::= "yes"',
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "ignored, as LocalAI ignores it",
        }
    )
    o = request.options
    assert o.Prompt == "Once upon a time" and o.UseTokenizerTemplate is False and not o.Messages
    assert o.Temperature == pytest.approx(0.7) and o.TopP == pytest.approx(0.9)
    assert (o.Tokens, list(o.StopPrompts), o.Seed, o.TopK) == (32, ["\n", "END"], -5, 40)
    assert (o.PresencePenalty, o.FrequencyPenalty) == (0.5, -0.5)
    assert o.MinP == pytest.approx(0.05) and o.TypicalP == pytest.approx(0.8) and o.Penalty == pytest.approx(1.1)
    assert (o.Logprobs, o.LogitBias, o.Grammar, o.IgnoreEOS) == (2, '{"50256": -100}', 'root ::= "yes"', True)
    assert (request.stream, request.include_usage, request.max_tokens) == (True, True, 32)
    # max_completion_tokens (the newer name) wins over max_tokens
    chat = mapping.chat_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 5,
            "max_completion_tokens": 7,
            "logprobs": True,
            "top_logprobs": 3,
            "tools": [{"type": "function"}],
            "tool_choice": "auto",
        }
    )
    assert (chat.options.Tokens, chat.options.Logprobs, chat.options.TopLogprobs) == (7, 1, 3)
    assert (chat.options.Tools, chat.options.ToolChoice) == ('[{"type": "function"}]', "auto")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "  ", "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 2**40}, "seed"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
    ],
)
def test_bad_chat_bodies_are_400s_naming_the_field(body, param):
    error = refused(mapping.chat_request, body)
    assert error.param == param
    document = error.body()["error"]
    assert set(document) == {"message", "type", "param", "code"}
    assert document["type"] == "invalid_request_error" and document["message"]


def test_completion_takes_one_prompt():
    assert refused(mapping.completion_request, {"model": "m", "prompt": ["a", "b"]}).param == "prompt"
    assert refused(mapping.completion_request, {"model": "m"}).param == "prompt"


def test_embedding_inputs_and_encodings():
    request = mapping.embedding_request({"model": "e", "input": ["one", [1, 2, 3]], "encoding_format": "base64"})
    assert [(i.Embeddings, list(i.EmbeddingTokens)) for i in request.inputs] == [("one", []), ("", [1, 2, 3])]
    assert request.base64 is True
    assert [i.EmbeddingTokens for i in mapping.embedding_request({"model": "e", "input": [7, 8]}).inputs] == [[7, 8]]
    assert refused(mapping.embedding_request, {"model": "e", "input": []}).param == "input"
    assert refused(mapping.embedding_request, {"model": "e", "input": "x", "encoding_format": "hex"}).param == (
        "encoding_format"
    )

    results = [
        backend_pb2.EmbeddingResult(embeddings=[0.5, -1.0], prompt_tokens=1),
        backend_pb2.EmbeddingResult(embeddings=[0.25, 0.0], tokens=3),
    ]
    answer = mapping.embedding_answer(request, results)
    assert answer["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    decoded = struct.unpack("<2f", base64.b64decode(answer["data"][1]["embedding"]))
    assert decoded == (0.25, 0.0)
    plain = mapping.embedding_answer(mapping.embedding_request({"model": "e", "input": "x"}), results[:1])
    assert plain["data"] == [{"object": "embedding", "index": 0, "embedding": [0.5, -1.0]}]
    assert plain["object"] == "list" and plain["model"] == "e"


def test_tally_keeps_the_backends_running_counts_and_whole_characters():
    tally = mapping.Tally()
    snowman = "☃".encode()
    texts = [
        tally.add(backend_pb2.Reply(message=b"a" + snowman[:1], tokens=1, prompt_tokens=5)),
        tally.add(backend_pb2.Reply(message=snowman[1:], tokens=2, prompt_tokens=5)),
        tally.add(backend_pb2.Reply(message=b" b", tokens=3, prompt_tokens=5)),
    ]
    assert texts == ["a", "☃", " b"]  # a character split between replies is sent whole
    assert (tally.prompt_tokens, tally.completion) == (5, 3)
    assert (
        tally.finish_reason(3) == "length" and tally.finish_reason(4) == "stop" and tally.finish_reason(None) == "stop"
    )

    uncounted = mapping.Tally()  # a backend that counts nothing: its non-empty chunks count
    for piece in (b"x", b"", b"y"):
        uncounted.add(backend_pb2.Reply(message=piece))
    assert uncounted.completion == 2
    deltas = mapping.Tally()  # newer backends may send ChatDelta content instead of message
    assert deltas.add(backend_pb2.Reply(chat_deltas=[backend_pb2.ChatDelta(content="hi")])) == "hi"


def test_answers_have_openais_shapes():
    chat = mapping.chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    tally = mapping.Tally()
    tally.add(backend_pb2.Reply(message=b"x", tokens=1, prompt_tokens=2))
    whole = mapping.text_answer(chat, "chatcmpl-1", 100, "x", tally)
    assert whole == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 100,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop", "logprobs": None}
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }
    first = mapping.text_chunk(chat, "chatcmpl-1", 100, "", None, first=True)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert mapping.text_chunk(chat, "chatcmpl-1", 100, None, "stop")["choices"][0]["delta"] == {}
    assert mapping.usage_chunk(chat, "chatcmpl-1", 100, tally)["choices"] == []

    before, after = mapping.chunk_frame(chat, "chatcmpl-1", 100)  # the per-token fast path
    assert json.loads((before + json.dumps('a "b" é') + after)[len("data: ") :]) == mapping.text_chunk(
        chat, "chatcmpl-1", 100, 'a "b" é', None
    )
    assert after.endswith("\n\n")

    completion = mapping.completion_request({"model": "m", "prompt": "p"})
    assert mapping.text_answer(completion, "cmpl-1", 1, "p", tally)["choices"][0]["text"] == "p"
    assert mapping.text_chunk(completion, "cmpl-1", 1, "p", None)["object"] == "text_completion"
    assert completion.object_prefix == "cmpl" and chat.object_prefix == "chatcmpl"


# --- affinity -------------------------------------------------------------------------------


def chat(messages, **extra):
    return {"model": "m", "messages": messages, **extra}


def test_the_user_field_is_the_affinity_key_whatever_the_prompt():
    first = mapping.chat_request(chat([{"role": "user", "content": "a"}], user="alice"), prefix_chars=512)
    second = mapping.chat_request(chat([{"role": "user", "content": "b"}], user="alice"), prefix_chars=512)
    other = mapping.chat_request(chat([{"role": "user", "content": "a"}], user="bob"), prefix_chars=512)
    assert first.affinity_key == second.affinity_key != other.affinity_key
    assert first.affinity_key.startswith("user:") and "alice" not in first.affinity_key
    assert len(first.affinity_key) <= 64


def test_requests_sharing_a_prefix_share_a_key_and_a_later_turn_keeps_it():
    system = {"role": "system", "content": "You are a helpful assistant. " * 30}  # over 512 characters
    turn_1 = [system, {"role": "user", "content": "hello"}]
    turn_2 = [*turn_1, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]
    keys = {mapping.chat_request(chat(turns), prefix_chars=512).affinity_key for turns in (turn_1, turn_2)}
    assert len(keys) == 1 and next(iter(keys)).startswith("prefix:")
    short_a = mapping.chat_request(chat([{"role": "user", "content": "one"}]), prefix_chars=512).affinity_key
    short_b = mapping.chat_request(chat([{"role": "user", "content": "two"}]), prefix_chars=512).affinity_key
    assert short_a != short_b  # shorter than the prefix: the whole conversation is the key
    # the role is part of the text: the same words said by another role are another prefix
    assert mapping.chat_request(chat([{"role": "system", "content": "one"}]), prefix_chars=512).affinity_key != short_a


def test_completions_key_on_the_prompt_prefix_and_zero_turns_prefix_affinity_off():
    long = "x" * 600
    assert (
        mapping.completion_request({"model": "m", "prompt": long + "a"}, prefix_chars=512).affinity_key
        == mapping.completion_request({"model": "m", "prompt": long + "b"}, prefix_chars=512).affinity_key
    )
    assert mapping.completion_request({"model": "m", "prompt": long}, prefix_chars=0).affinity_key is None
    keyed = mapping.completion_request({"model": "m", "prompt": long, "user": "u"}, prefix_chars=0)
    assert keyed.affinity_key.startswith("user:")  # the user field counts even without prefix affinity
    assert mapping.chat_request(chat([{"role": "user", "content": "a"}], user=""), prefix_chars=0).affinity_key is None
