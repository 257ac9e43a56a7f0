"""Structured output and tool calls through a real `tandem serve` (uvicorn on loopback, the
real SmolLM2) with the clients people use: openai (`.parse()` with a pydantic model, tools,
streamed tool-call deltas), ollama-python (format, tools), langchain-openai
(`with_structured_output`, `bind_tools`) and litellm (tools).

SmolLM2 (135M) has no tool template: it gets the generic Hermes-style tool prompt, and
tool_choice "required" / a named function makes the grammar force a well-formed call.
Qwen2.5-Coder (0.5B, its own template) calls tools on its own with tool_choice "auto": the
lazy grammar holds the call, from its opening on, to a schema the model would not meet
unaided (a 3-letter city, a unit of one letter).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx2
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from test_server import Server

from runtime.server.app import create_app
from runtime.server.models import RegistryOptions

MODEL = "smollm2"
SERVED = "smollm2:latest"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
QWEN = "qwen2.5-coder:0.5b"
# With a system message Qwen2.5-Coder calls (bare {"name": ...}); without, it often fences
# the call in ```json or writes it after a sentence, neither of which is a call.
ASK_TOOL = [
    {"role": "system", "content": "You are a weather assistant. Answer with a tool call."},
    *ASK,
]
TERSE = {  # Qwen2.5-Coder unconstrained writes {"city": "Paris", "unit": "celsius"}
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 3},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def server(smollm2_path):
    app = create_app(RegistryOptions(num_ctx=1024, max_num_seqs=8), preload=MODEL)
    srv = Server(app)
    deadline = time.time() + 300
    while httpx2.get(f"{srv.url}/health").status_code != 200:
        assert time.time() < deadline, "the preloaded model never became ready"
        time.sleep(0.1)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def qwen_server(qwen_coder_path):
    app = create_app(RegistryOptions(num_ctx=1024, max_num_seqs=2), preload=QWEN)
    srv = Server(app)
    deadline = time.time() + 300
    while httpx2.get(f"{srv.url}/health").status_code != 200:
        assert time.time() < deadline, "the preloaded model never became ready"
        time.sleep(0.1)
    yield srv
    srv.stop()


def _check_weather_call(name: str, arguments: str | dict) -> None:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert name == "get_weather"
    jsonschema.validate(args, WEATHER["function"]["parameters"])


def test_openai_parse_with_a_pydantic_model(client):
    done = client.chat.completions.parse(
        model=SERVED,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format=Person,
        temperature=0.8,
        seed=1,
        max_tokens=60,
    )
    person = done.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 120


def test_openai_json_object_and_a_refused_schema(client):
    # Sampled at 0.8, an answer may still be inside a string when max_tokens cuts it: every
    # answer is an object's beginning, and each one the model ended itself parses as an object
    # (which seeds end within the budget depends on the kernels' rounding, so several are asked).
    ended = 0
    for seed in range(1, 7):
        done = client.chat.completions.create(
            model=SERVED,
            messages=[{"role": "user", "content": "Give me a JSON object."}],
            response_format={"type": "json_object"},
            temperature=0.8,
            seed=seed,
            max_tokens=120,
        )
        text = done.choices[0].message.content
        assert text.lstrip().startswith("{"), text
        if done.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text
            ended += 1
    assert ended, "no seed's answer ended within 120 tokens"
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        client.chat.completions.create(
            model=SERVED,
            messages=ASK,
            max_tokens=5,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
            },
        )


def test_openai_tool_choice_required_gives_a_parsed_call(client):
    done = client.chat.completions.create(
        model=SERVED,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0.8,
        seed=3,
        max_tokens=80,
    )
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    _check_weather_call(call.function.name, call.function.arguments)
    # the call and its result go back in the history; the model then answers in text
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    again = client.chat.completions.create(
        model=SERVED, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=8
    )
    assert again.choices[0].message.content


def test_openai_streamed_tool_call_deltas_for_a_named_function(client):
    stream = client.chat.completions.create(
        model=SERVED,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0.8,
        seed=4,
        max_tokens=80,
        stream=True,
    )
    name, arguments, finish = "", "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            name += tc.function.name or ""
            arguments += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    _check_weather_call(name, arguments)


def test_ollama_python_format_and_tools(server):
    import ollama

    c = ollama.Client(host=server.url)
    schema = Person.model_json_schema()
    r = c.chat(
        model=SERVED,
        messages=[{"role": "user", "content": "Invent a person."}],
        format=schema,
        options={"temperature": 0.8, "seed": 5, "num_predict": 60},
    )
    Person.model_validate_json(r.message.content)
    # tools offered, a call and its result in the history (ollama has no tool_choice)
    history = ASK + [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "function": {
                        "name": "get_weather",
                        "arguments": {"city": "Paris", "unit": "celsius"},
                    }
                }
            ],
        },
        {"role": "tool", "content": '{"temp": 21}', "tool_name": "get_weather"},
    ]
    r = c.chat(model=SERVED, messages=history, tools=[WEATHER], options={"num_predict": 8})
    assert r.message.role == "assistant" and r.done
    for call in r.message.tool_calls or []:  # whatever the model chose, calls come parsed
        assert call.function.name


def test_langchain_structured_output_and_bind_tools(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=SERVED,
        base_url=f"{server.url}/v1",
        api_key="unused",
        temperature=0.8,
        seed=6,
        max_tokens=80,
    )
    person = llm.with_structured_output(Person).invoke("Invent a person.")
    assert isinstance(person, Person)
    msg = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Paris?")
    assert msg.tool_calls
    _check_weather_call(msg.tool_calls[0]["name"], msg.tool_calls[0]["args"])


def test_litellm_chat_with_tools(server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    r = litellm.completion(
        model=f"openai/{SERVED}",
        api_base=f"{server.url}/v1",
        api_key="unused",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0.8,
        seed=7,
        max_tokens=80,
    )
    call = r.choices[0].message.tool_calls[0]
    _check_weather_call(call.function.name, call.function.arguments)


def _check_terse_call(name: str, arguments: str | dict, tool: dict = TERSE) -> None:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert name == "get_weather"
    jsonschema.validate(args, tool["function"]["parameters"])


def test_openai_tool_choice_auto_holds_the_call_to_the_schema(qwen_server):
    client = openai.OpenAI(base_url=f"{qwen_server.url}/v1", api_key="unused", max_retries=0)
    messages: Any = ASK_TOOL
    tools: Any = [TERSE]
    done = client.chat.completions.create(
        model=QWEN, messages=messages, tools=tools, temperature=0.8, seed=8, max_tokens=80
    )
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call: Any = choice.message.tool_calls[0]
    _check_terse_call(call.function.name, call.function.arguments)


def test_ollama_python_tools_hold_the_call_to_the_schema(qwen_server):
    import ollama

    # ollama-python's Tool model keeps a property's type, enum and description only (it
    # drops maxLength): the city as a postcode from an enum is what the grammar must hold
    # the model to (unaided it writes "Paris")
    terse = json.loads(json.dumps(TERSE))
    props = terse["function"]["parameters"]["properties"]
    props["city"] = {"type": "string", "enum": ["75001", "SW1A"]}
    props["unit"] = {"type": "string", "enum": ["C", "F"]}
    c = ollama.Client(host=qwen_server.url)
    r = c.chat(
        model=QWEN,
        messages=ASK_TOOL,
        tools=[terse],
        options={"temperature": 0.8, "seed": 9, "num_predict": 80},
    )
    assert r.message.tool_calls, r.message.content
    call = r.message.tool_calls[0]
    _check_terse_call(call.function.name, dict(call.function.arguments), terse)


def test_tool_choice_auto_refuses_a_schema_it_cannot_enforce(client):
    bad = {
        "type": "function",
        "function": {
            "name": "tag",
            "parameters": {"type": "array", "uniqueItems": True},
        },
    }
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        client.chat.completions.create(model=SERVED, messages=ASK, tools=[bad], max_tokens=5)
