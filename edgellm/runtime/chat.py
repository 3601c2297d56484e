# SPDX-License-Identifier: MIT
"""Chat prompts from a model's chat template: Jinja when jinja2 is installed, else built in.

Three ways a conversation becomes a prompt, chosen by :func:`apply_chat_template`:

- **Jinja** (jinja2 installed, the default): the template runs in jinja2's
  ``ImmutableSandboxedEnvironment`` with the options transformers uses (``trim_blocks``,
  ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now``, ``tojson``).
- **Built-in** (no jinja2, or ``engine="builtin"``): the template is recognised by its markers
  and formatted in code. Recognised families: ChatML ("<|im_start|>", as Qwen2 and SmolLM,
  including a default system prompt the template writes), Llama-2 ("[INST]" with "<<SYS>>"),
  Zephyr ("<|user|>" closed by the EOS text) and Llama-3 ("<|start_header_id|>"). The output
  equals the reference template of each family; a variant template may differ in details
  (Llama-3.1's date header, tool calls), for which jinja2 is needed.
- **Plain** (the model has no template): one line per message, ``"<Role>: <content>\\n"``
  with the role capitalised ("System", "User", "Assistant"), and, with
  add_generation_prompt, a final ``"Assistant:"`` (no trailing space, so the model's first
  word brings its own). No BOS text: the tokenizer adds BOS when encoding.
"""

from __future__ import annotations

import datetime
import functools
import importlib.util
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from ..errors import EdgeLLMError, InvalidArgumentError, ModelFormatError, UnsupportedError

__all__ = ["CHAT_FORMATS", "apply_chat_template", "detect_chat_format"]

#: Formats the built-in formatter writes; "plain" is the no-template layout.
CHAT_FORMATS = ("chatml", "llama2", "zephyr", "llama3", "plain")

_ENGINES = ("auto", "jinja", "builtin")
# A ChatML template's default system prompt: '<|im_start|>system\nTEXT<|im_end|>' written as a
# literal (TEXT has no quote, brace or tag, so it is not built from the messages).
_CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}<]*)<\|im_end\|>")
_JINJA_ESCAPES = {"n": "\n", "t": "\t", "'": "'", '"': '"', "\\": "\\"}


def detect_chat_format(template: str | None) -> str | None:
    """The built-in format matching a chat template, by its markers.

    Args:
        template: the Jinja template text, or None (no template).

    Returns:
        One of :data:`CHAT_FORMATS` ("plain" for None or an empty template), or None when
        the template is of no family the built-in formatter knows.
    """
    if template is None or not template.strip():
        return "plain"
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "[INST]" in template and "<<SYS>>" in template:
        return "llama2"
    if "<|user|>" in template and "<|assistant|>" in template and "eos_token" in template:
        return "zephyr"
    return None


def apply_chat_template(template: str | None, messages: Sequence[Mapping[str, Any]],
                        add_generation_prompt: bool = True, *, bos_token: str = "",
                        eos_token: str = "", engine: str = "auto",
                        extra: Mapping[str, Any] | None = None) -> str:
    """Render a conversation as the prompt text the model was trained on.

    Args:
        template: the model's chat template (``tokenizer.chat_template``), or None for the
            plain layout described in this module's docstring.
        messages: ``{"role": ..., "content": ...}`` mappings in order (roles "system",
            "user", "assistant"; a Jinja template may accept more).
        add_generation_prompt: end with the header that opens the assistant's reply.
        bos_token: the BOS token's text, for templates that write it (Llama-2/3).
        eos_token: the EOS token's text, for templates that write it (Llama-2, Zephyr).
        engine: "auto" (Jinja if jinja2 is installed, else built-in), "jinja" or "builtin".
        extra: more variables for a Jinja template (e.g. ``tools``, ``date_string``).

    Returns:
        The prompt text; encode it with ``parse_special=True`` so the template's special
        token texts become their ids.

    Raises:
        InvalidArgumentError: a malformed message, an unknown engine, or messages the
            template refuses (e.g. Llama-2's roles not alternating).
        ModelFormatError: the template is not valid Jinja, or breaks the sandbox.
        UnsupportedError: engine "jinja" without jinja2, or a template the built-in
            formatter does not recognise while jinja2 is missing.
    """
    if engine not in _ENGINES:
        raise InvalidArgumentError(f"engine must be one of {_ENGINES}, got {engine!r}")
    msgs = _check_messages(messages)
    fmt = detect_chat_format(template)
    if template is None or fmt == "plain":
        return _format_plain(msgs, add_generation_prompt)
    if engine == "jinja" or (engine == "auto" and _have_jinja()):
        if not _have_jinja():
            raise UnsupportedError("rendering chat templates with Jinja needs jinja2: "
                                   "pip install jinja2")
        return _render_jinja(template, msgs, add_generation_prompt, bos_token, eos_token,
                             dict(extra or {}))
    if fmt is None:
        raise UnsupportedError(
            "this chat template is not one the built-in formatter knows (ChatML, Llama-2, "
            "Zephyr, Llama-3); install jinja2 to render it: pip install jinja2")
    for m in msgs:
        if not isinstance(m["content"], str):
            raise InvalidArgumentError("the built-in chat formats need str message contents")
    formatter: Callable[..., str] = _BUILTIN[fmt]
    return formatter(template, msgs, add_generation_prompt, bos_token, eos_token)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain-dict copies of the messages, each with a str role and a content."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidArgumentError("messages must be a list of {'role', 'content'} mappings")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise InvalidArgumentError(
                f"message {k} must be a mapping with a str 'role' and a 'content', got {m!r}")
        out.append(dict(m))
    return out


# --- built-in formats ---------------------------------------------------------------------


def _format_plain(msgs: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    parts = []
    for m in msgs:
        if not isinstance(m["content"], str):
            raise InvalidArgumentError("the plain chat layout needs str message contents")
        role: str = m["role"]
        parts.append(f"{role[:1].upper()}{role[1:]}: {m['content']}\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


def _chatml(template: str, msgs: list[dict[str, Any]], gen: bool, bos: str, eos: str) -> str:
    parts = []
    default = _CHATML_DEFAULT_SYSTEM.search(template)
    if default and msgs and msgs[0]["role"] != "system":
        # The template's own system prompt, unescaped from its Jinja string literal.
        text = re.sub(r"\\(.)", lambda m: _JINJA_ESCAPES.get(m.group(1), m.group(0)),
                      default.group(1))
        parts.append(f"<|im_start|>system\n{text}<|im_end|>\n")
    parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs]
    if gen:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _llama2(template: str, msgs: list[dict[str, Any]], gen: bool, bos: str, eos: str) -> str:
    # The generation prompt is implicit: the prompt ends with "[/INST]".
    if not msgs:
        raise InvalidArgumentError("the Llama-2 chat format needs at least one message")
    system: str | None = None
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    parts = []
    for k, m in enumerate(msgs):
        if (m["role"] == "user") != (k % 2 == 0):
            raise InvalidArgumentError(
                "chat template refused the messages: Conversation roles must alternate "
                "user/assistant/user/assistant/...")
        content = m["content"]
        if k == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            parts.append(f"{bos}[INST] {content.strip()} [/INST]")
        elif m["role"] == "assistant":
            parts.append(f" {content.strip()} {eos}")
    return "".join(parts)


def _zephyr(template: str, msgs: list[dict[str, Any]], gen: bool, bos: str, eos: str) -> str:
    parts = [f"<|{m['role']}|>\n{m['content']}{eos}\n" for m in msgs
             if m["role"] in ("system", "user", "assistant")]
    if gen and msgs:  # the template opens the reply after the last message only
        parts.append("<|assistant|>\n")
    return "".join(parts)


def _llama3(template: str, msgs: list[dict[str, Any]], gen: bool, bos: str, eos: str) -> str:
    parts = [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
             for m in msgs]
    if parts:
        parts[0] = bos + parts[0]
    if gen:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


_BUILTIN: dict[str, Callable[[str, list[dict[str, Any]], bool, str, str], str]] = {
    "chatml": _chatml, "llama2": _llama2, "zephyr": _zephyr, "llama3": _llama3,
}


# --- Jinja --------------------------------------------------------------------------------


@functools.cache
def _have_jinja() -> bool:
    return importlib.util.find_spec("jinja2") is not None


def _raise_exception(message: str) -> None:
    raise InvalidArgumentError(f"chat template refused the messages: {message}")


def _tojson(value: Any, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    # transformers' tojson: unlike jinja2's, no HTML escaping and non-ASCII kept.
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """The compiled template (cached: a model keeps one template for its lifetime)."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelFormatError(f"the chat template is not valid Jinja: {exc}") from None


def _render_jinja(template: str, msgs: list[dict[str, Any]], gen: bool, bos: str, eos: str,
                  extra: dict[str, Any]) -> str:
    import jinja2.exceptions

    compiled = _compile(template)
    try:
        return str(compiled.render(**{**extra, "messages": msgs, "add_generation_prompt": gen,
                                      "bos_token": bos, "eos_token": eos}))
    except EdgeLLMError:
        raise
    except jinja2.exceptions.SecurityError as exc:
        raise ModelFormatError(f"the chat template broke the sandbox: {exc}") from None
    except Exception as exc:
        raise InvalidArgumentError(
            f"the chat template failed on these messages: {type(exc).__name__}: {exc}") from None
