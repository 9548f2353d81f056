"""The OpenAI answer formats ``formerkit.openai_api`` builds: the legacy completions logprobs object (for the
generated tokens and, with echo, the prompt's), the chat logprobs object, usage counts, server-sent event lines, and
a chat message's text. ``choice`` arguments are ``openai_api``'s per-choice state (``text_of``, ``pieces``,
``generated``)."""

import json
from typing import Any

from formerkit.errors import ServeError
from formerkit.generation.requests import TokenEvent

__all__ = ["chat_logprobs", "completion_logprobs", "join_logprobs", "message_text", "prompt_logprobs", "sse",
           "usage"]


def completion_logprobs(choice, tokens: list[tuple[int, TokenEvent]], base_offset: int) -> dict:
    """OpenAI's legacy logprobs object for the shown tokens ``tokens`` of a completion."""
    logprobs: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for position, event in tokens:
        logprobs["tokens"].append(choice.text_of(event.token))
        logprobs["token_logprobs"].append(event.logprob)
        logprobs["top_logprobs"].append({choice.text_of(token): value for token, value in event.top_logprobs or ()})
        logprobs["text_offset"].append(base_offset + choice.pieces.offsets[position])
    return logprobs


def prompt_logprobs(service, ids: list[int], values: list) -> dict:
    logprobs: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    decode = service.tokenizer.decode
    for position, (token, (value, top)) in enumerate(zip(ids, values)):
        logprobs["tokens"].append(decode([token]))
        logprobs["token_logprobs"].append(value)
        logprobs["top_logprobs"].append(None if top is None else {decode([t]): v for t, v in top})
        logprobs["text_offset"].append(len(decode(ids[:position])))
    return logprobs


def join_logprobs(first: dict | None, second: dict) -> dict:
    if first is None:
        return second
    return {key: first[key] + second[key] for key in second}


def chat_logprobs(choice, tokens: list[tuple[int, TokenEvent]], top: int) -> dict:
    def entry(text: str, value: float) -> dict:
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    content = []
    for _, event in tokens:
        item = entry(choice.text_of(event.token), event.logprob)
        item["top_logprobs"] = [entry(choice.text_of(token), value) for token, value in (event.top_logprobs or ())][
            :top]
        content.append(item)
    return {"content": content, "refusal": None}


def usage(prompt_tokens: int, choices: list) -> dict:
    completion = sum(choice.generated for choice in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def message_text(message, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for number, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ServeError(400, f"messages[{index}].content[{number}]: only text parts are supported, got type "
                                  f"{part.get('type')!r}", param=f"messages[{index}].content[{number}]",
                             code="invalid_value")
        texts.append(part["text"])
    return "".join(texts)
