"""The HTTP plumbing of ``formerkit serve``: the body-size limit (an ASGI middleware that also reads every body as
JSON), the error answers (OpenAI's shape on the OpenAI-compatible endpoints, ``{"error": message}`` on the others),
pydantic's validation failures as one message naming the field at fault, and the curl line ``formerkit serve`` prints
(``example_call``)."""

import base64
import io
import json
import shlex

from formerkit.errors import ServeError

__all__ = ["ERROR_TYPES", "BodyLimit", "error_body", "example_call", "is_openai", "validation_message"]


class BodyLimit:
    """ASGI middleware: a body declared larger than ``limit`` is refused (413) before any of it is read; one sent
    without a length is counted as it arrives and refused once past the limit. Every body is read as JSON: the
    content type is set to ``application/json`` whatever the client declared (curl's ``-d`` declares a form)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = [(name, value) for name, value in scope.get("headers") or [] if name != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        declared = dict(headers).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            message = f"request body of {int(declared)} bytes exceeds the limit of {self.limit} bytes"
            error = error_body(scope["path"], message, 413, None, "request_too_large")
            body = json.dumps(error).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise ServeError(413, f"request body exceeds the limit of {self.limit} bytes", code="request_too_large")
            return message

        await self.app(scope, counted, send)


# The OpenAI error types by status (their API's names; clients map the status to an exception class).
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def is_openai(path: str) -> bool:
    return path.startswith(("/v1/completions", "/v1/chat/", "/v1/embeddings", "/v1/models", "/v1/images/"))


def error_body(path: str, message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """The error answer: OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` on the OpenAI-compatible
    endpoints, ``{"error": message}`` on the others."""
    if not is_openai(path):
        return {"error": message}
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A pydantic validation failure as one message, and the first field at fault (``messages[0].role``)."""
    details, params = [], []
    for item in errors:
        location = [part for part in item["loc"] if part != "body"]
        if item.get("type") == "json_invalid":
            details.append(f"body: not valid JSON ({item.get('ctx', {}).get('error', item['msg'])})")
            continue
        param = ""
        for part in location:
            param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
        # pydantic names the member of a union it tried ("prompt.str"): the field itself is what the client sent.
        param = param.split(".function-")[0]
        params.append(param or None)
        details.append(f"{param or 'body'}: {item['msg']}")
    return "; ".join(details) or "malformed request", (params[0] if params else None)


def example_call(service, base_url: str) -> str:
    """A curl command line that works as printed against the server at ``base_url``, for the model's task."""
    if service.task == "causal_lm":
        path, body = "/v1/completions", {"model": service.model_id, "prompt": _example_prompt(service),
                                         "max_tokens": 32, "temperature": 0}
    elif service.embeds:
        path, body = "/v1/embeddings", {"model": service.model_id, "input": _example_prompt(service)}
    elif service.task == "classification":
        path, body = "/v1/classify", {"image": _blank_png(service.preprocessing)}
    elif service.task == "image_generation":
        first_class = (service.image_generator.classes or ["0"])[0]
        path, body = "/v1/images/generations", {"model": service.model_id, "prompt": first_class, "n": 1, "seed": 0}
    else:
        columns = len(service.preprocessing["columns"])
        row = [0.0] * columns if columns > 1 else 0.0
        path, body = "/v1/forecast", {"values": [row] * service.preprocessing["window"]}
    return f"curl -s {base_url}{path} -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}"


def _example_prompt(service) -> str:
    """A prompt the tokenizer can encode: "def " when it can (the stdlib recipes), else its first few symbols."""
    for text in ("def ", "The ", "a"):
        ids = service.tokenizer.encode(text)
        if ids and service.tokenizer.decode(ids) == text:
            return text
    return service.tokenizer.decode([0, 1, 2])


def _blank_png(preprocessing: dict) -> str:
    from PIL import Image

    height, width = preprocessing["image_size"]
    mode = "L" if preprocessing["in_channels"] == 1 else "RGB"
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
