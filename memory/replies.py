"""What a model's answer really says: its reply, its private thinking and its calls.

Real models wrap their answers in more than the protocol: reasoning in `<think>` tags or
in a field of its own, tool calls written as text when the server's parser missed them
(Hermes/Qwen `<tool_call>` tags, a bare Llama-style JSON object, Mistral's `[TOOL_CALLS]`,
a fenced json block), chat-template tokens, and the transcript prefix the model saw on
every user message. These rules work on a whole answer's text, so a streaming client can
apply the same ones to what it has gathered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

# a thinking span must never grow the stored conversation without bound
MAX_THINKING_CHARS = 20000


@dataclass
class TextCall:
    name: str
    arguments: str  # JSON text, as in a structured call


@dataclass
class Reading:
    text: str  # what may be shown to people
    thinking: str = ""  # private reasoning: never posted, never sent back as content
    calls: list[TextCall] = field(default_factory=list)  # calls written as text
    # markup that looked like a call but could not be read: the model should be told
    malformed: list[str] = field(default_factory=list)


_THINK_BLOCK = re.compile(r"<(think|thinking|reasoning)>(.*?)(?:</\1>|$)", re.DOTALL | re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</(?:think|thinking|reasoning)>", re.IGNORECASE)


def split_thinking(content: str, reasoning: str = "") -> tuple[str, str]:
    """(the answer without thinking, the thinking): `<think>` blocks, an unclosed one (cut off),
    a lone closing tag (the chat template opened the block) and the server's reasoning field."""
    thoughts = [reasoning.strip()] if reasoning.strip() else []
    close = _THINK_CLOSE.search(content)
    opened = re.search(r"<(?:think|thinking|reasoning)>", content, re.IGNORECASE)
    if close and (opened is None or close.start() < opened.start()):
        thoughts.append(content[: close.start()].strip())
        content = content[close.end() :]

    def keep(match: re.Match[str]) -> str:
        thoughts.append(match.group(2).strip())
        return ""

    content = _THINK_BLOCK.sub(keep, content)
    thinking = "\n\n".join(t for t in thoughts if t)
    if len(thinking) > MAX_THINKING_CHARS:
        thinking = thinking[:MAX_THINKING_CHARS] + "…"
    return content, thinking


# chat-template control tokens: a header that opens the answer is dropped, anything after a
# token that ends the turn is the model writing the next turn itself
_LEADING_HEADER = re.compile(
    r"^\s*(?:<\|im_start\|>\s*assistant\b|<\|start_header_id\|>\s*assistant\s*<\|end_header_id\|>"
    r"|<start_of_turn>\s*model\b|<\|assistant\|>|<\|begin_of_text\|>|<s>|\[/INST\])\s*",
    re.IGNORECASE,
)
_TEMPLATE_TOKEN = re.compile(
    r"<\|(?:im_start|im_end|eot_id|end_of_text|endoftext|start_header_id|end_header_id|eom_id|end|user|system|assistant)\|>"
    r"|<(?:start|end)_of_turn>|</s>|\[INST\]|\[/INST\]|<\|python_tag\|>",
    re.IGNORECASE,
)
# the prefix every user message and event carries in the prompt (recall.Message.to_openai)
_STAMP = r"\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}(?: system event)?\]"
_LEADING_STAMP = re.compile(rf"^\s*{_STAMP}[ \t]*(?:[^\n:\[\]]{{1,80}}:[ \t]*)?")
_LATER_STAMP = re.compile(rf"\n\s*{_STAMP}")
_SYSTEM_EVENT = re.compile(r"^\s*\[system event\][^\n]*\n?", re.IGNORECASE | re.MULTILINE)


def clean_text(text: str) -> str:
    """Text as it may be shown to people: without template tokens or copied transcript lines."""
    while True:
        stripped = _LEADING_HEADER.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped
    token = _TEMPLATE_TOKEN.search(text)
    if token:
        text = text[: token.start()]
    text = _SYSTEM_EVENT.sub("", text)
    text = _LEADING_STAMP.sub("", text, count=1)
    later = _LATER_STAMP.search(text)
    if later:  # the model went on writing the transcript: the next lines are not its reply
        text = text[: later.start()]
    return text.strip()


_TAGGED = re.compile(r"<(tool_call|function_call)>(.*?)(?:</\1>|$)", re.DOTALL | re.IGNORECASE)
_MISTRAL = re.compile(r"\[TOOL_CALLS\]\s*", re.IGNORECASE)
_FENCED = re.compile(r"```[ \t]*(?:json|tool_call|tool_code)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)
_DECODER = json.JSONDecoder()


def _as_call(value: Any, names: Collection[str]) -> TextCall | None:
    """A JSON value that is a call of one of `names`, in any of the shapes models write."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):  # {"type": "function", "function": {...}}
        value = value["function"]
    name = value.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return TextCall(name, args)
    return TextCall(name, json.dumps(args if args is not None else {}, ensure_ascii=False))


def _calls_in(text: str, names: Collection[str]) -> list[TextCall] | None:
    """The calls one JSON text holds (an object or a list of them), None when it holds none."""
    try:
        value, _ = _DECODER.raw_decode(text.strip())
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [c for c in (_as_call(v, names) for v in items) if c]
    return calls if calls and len(calls) == len(items) else None


def _bare_objects(text: str, names: Collection[str]) -> tuple[list[TextCall], str]:
    """Llama-style bare `{"name": …, "parameters": …}` objects naming one of our tools, and the text without them."""
    calls: list[TextCall] = []
    out: list[str] = []
    i = 0
    while True:
        start = text.find("{", i)
        if start < 0:
            out.append(text[i:])
            break
        try:
            value, end = _DECODER.raw_decode(text, start)
        except ValueError:
            out.append(text[i : start + 1])
            i = start + 1
            continue
        call = _as_call(value, names)
        if call is None:
            out.append(text[i:end])
        else:
            calls.append(call)
            out.append(text[i:start])
        i = end
    return calls, "".join(out)


def read(content: str, tool_names: Collection[str], reasoning: str = "") -> Reading:
    """An answer's text as reply, thinking and the calls it wrote as text.

    Only calls naming one of `tool_names` are taken: text that merely mentions JSON, or
    JSON naming no tool of ours, stays the reply. Call markup that cannot be read is
    removed from the reply all the same, and reported in `malformed`.
    """
    text, thinking = split_thinking(content, reasoning)
    calls: list[TextCall] = []
    malformed: list[str] = []

    def tagged(match: re.Match[str]) -> str:
        found = _calls_in(match.group(2), tool_names)
        if found is None:
            malformed.append(match.group(0).strip()[:200])
        else:
            calls.extend(found)
        return ""

    text = _TAGGED.sub(tagged, text)
    mistral = _MISTRAL.search(text)
    if mistral:
        rest = text[mistral.end() :]
        found = _calls_in(rest, tool_names)
        if found is None:
            malformed.append(text[mistral.start() :].strip()[:200])
        else:
            calls.extend(found)
        text = text[: mistral.start()]

    def fenced(match: re.Match[str]) -> str:
        found = _calls_in(match.group(1), tool_names)
        if found is None:
            return match.group(0)
        calls.extend(found)
        return ""

    text = _FENCED.sub(fenced, text)
    if tool_names and "{" in text:
        bare, text = _bare_objects(text, tool_names)
        calls.extend(bare)
    return Reading(clean_text(text), thinking, calls, malformed)


def describe_tools(schemas: list[dict[str, Any]]) -> str:
    """The tools in a few lines, for models that get no `tools` parameter: one line a tool,
    its parameters by name (required ones without `?`), and how to call one."""
    lines = []
    for schema in schemas:
        fn = schema.get("function", schema)
        params = fn.get("parameters", {})
        required = set(params.get("required", []))
        args = ", ".join(
            f"{name}{'' if name in required else '?'}: {_type(spec)}" for name, spec in params.get("properties", {}).items()
        )
        lines.append(f"- {fn['name']}({args}): {fn.get('description', '')}")
    return (
        "### Functions\n"
        "To call a function, write only this, one per call:\n"
        '<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>\n'
        "The result comes back in the next message. Anything else you write is your answer to the user.\n" + "\n".join(lines)
    )


def _type(spec: dict[str, Any]) -> str:
    if "enum" in spec:
        return "|".join(str(v) for v in spec["enum"])
    kind = spec.get("type", "any")
    if kind == "array":
        return f"[{_type(spec.get('items', {}))}]"
    return str(kind)


def as_text_mode(messages: list[dict[str, Any]], schemas: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """A request for a server without native tools: the tools described after the system prompt,
    earlier calls written back in the form the model is asked to use, results as user messages."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "system" and not out and schemas:
            out.append({**m, "content": f"{m['content']}\n{describe_tools(schemas)}"})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            written = [
                json.dumps(
                    {"name": c["function"]["name"], "arguments": _loaded(c["function"].get("arguments", ""))}, ensure_ascii=False
                )
                for c in m["tool_calls"]
            ]
            text = "\n".join([*([m["content"]] if m.get("content") else []), *(f"<tool_call>{w}</tool_call>" for w in written)])
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"[function result] {m.get('content', '')}"})
        else:
            out.append(m)
    return out


def _loaded(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
