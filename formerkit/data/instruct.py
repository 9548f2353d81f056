"""Instruction data: JSON lines of prompt/response pairs or chats, trained on the responses only.

Each line of the file (``data.source: instruct``, ``data.path``) is one conversation, either

    {"prompt": "What is 2 + 2?", "response": "4"}                       (a system turn: add "system": "...")
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

A conversation becomes text through a **chat template**: the tokenizer's own (a checkpoint converted from Hugging Face
keeps ``chat_template`` in its tokenizer config; it is rendered with jinja2, the way ``transformers`` renders it: the
variables ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and ``raise_exception``), or, for a
tokenizer without one (byte, char, bpe, or data.chat_template: default), this default::

    <|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n

The **loss counts only the assistant's tokens**: for each assistant turn the template is rendered up to that turn
with the generation prompt (the ``<|assistant|>\\n`` header: context, not predicted) and then with the turn (its
content and the end-of-turn marker, predicted: the model learns to stop). Each such piece of text is tokenized on its
own (no special tokens added), so the boundary between context and response is a token boundary whatever the
tokenizer. A template whose rendering of a shorter conversation is not a prefix of the longer one cannot be split so,
and is refused naming the line.

Conversations are laid into rows of ``data.seq_len + 1`` tokens like packed documents (``formerkit.data.packing``):
one per row (right-padded), or with ``data.pack`` several per row, each seeing only itself; a conversation longer
than a row is cut into pieces (the piece's first token is context only). A ``loss_mask`` travels with the rows through
the same packing, so packing never moves the response boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from formerkit.data.base import DataBundle, DataError
from formerkit.data.files import existing_path, jsonl_records
from formerkit.data.packing import PackedRows, PackedSplit, one_document_per_row, pack_documents
from formerkit.data.tokenizers import Tokenizer

__all__ = ["DEFAULT_END", "Conversation", "InstructSplit", "encode_plain", "instruct_bundle", "read_conversations",
           "render_conversation", "tokenize_conversation"]

ROLES = ("system", "user", "assistant")
# The default template's end-of-turn marker (see the module docstring).
DEFAULT_END = "<|end|>"
PACKING_SEED = 0


@dataclass(frozen=True)
class Conversation:
    """One line's messages: (role, content) pairs, roles in ROLES, at least one assistant turn."""

    messages: tuple[tuple[str, str], ...]

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


def _conversation(record: dict, where: str) -> Conversation:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        pairs = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                    or message.get("role") not in ROLES:
                raise DataError(f"{where}: messages[{index}] must be {{\"role\": one of {list(ROLES)}, \"content\": "
                                f"a string}}; got {message!r:.80}")
            pairs.append((message["role"], message["content"]))
    elif "prompt" in record or "response" in record:
        for name in ("prompt", "response"):
            if not isinstance(record.get(name), str):
                raise DataError(f"{where}: field {name!r} must be a string (a prompt/response pair)")
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where}: field 'system' must be a string")
        pairs = ([("system", system)] if system else []) + [("user", record["prompt"]),
                                                            ("assistant", record["response"])]
    else:
        raise DataError(f"{where}: expected {{\"prompt\", \"response\"}} or {{\"messages\": [...]}}; the object has "
                        f"{sorted(record)[:10]}")
    if not any(role == "assistant" for role, _ in pairs):
        raise DataError(f"{where}: no assistant message: nothing to train on")
    return Conversation(tuple(pairs))


def read_conversations(path: str | Path, max_bytes: int | None = None) -> list[Conversation]:
    """Every line of a JSON-lines file as a Conversation; DataError naming the line otherwise."""
    path = Path(path)
    conversations, total = [], 0
    for number, record in jsonl_records(path):
        conversations.append(_conversation(record, f"{path}, line {number}"))
        total += sum(len(content) for _, content in conversations[-1].messages)
        if max_bytes is not None and total >= max_bytes:
            break
    if not conversations:
        raise DataError(f"{path}: no conversations (the file is empty)")
    return conversations


def _default_render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = "".join(f"<|{m['role']}|>\n{m['content']}{DEFAULT_END}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def chat_template(tokenizer: Tokenizer, choice: str | None = None) -> str | None:
    """The jinja template to render with: the tokenizer's own (the one named "default" when it holds several), or
    None for the default template (no template, or ``choice == "default"``)."""
    if choice == "default":
        return None
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...] as tokenizer_config.json may hold
        template = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _jinja_renderer(template: str, tokenizer: Tokenizer):
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as error:  # jinja2 comes with torch; a build without it falls back to nothing silently
        raise DataError("the tokenizer has a chat template, and rendering it needs jinja2 (pip install jinja2); or "
                        "set data.chat_template: default") from error

    def raise_exception(message):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    compiled = environment.from_string(template)
    special = getattr(tokenizer, "special_token", lambda name: None)
    names = {name: special(name) or "" for name in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **names)

    return render


def renderer(tokenizer: Tokenizer, choice: str | None = None):
    """``render(messages, add_generation_prompt) -> text`` for ``tokenizer`` (see ``chat_template``)."""
    template = chat_template(tokenizer, choice)
    if template is None and choice == "tokenizer":
        raise DataError("data.chat_template is 'tokenizer' but the tokenizer has no chat template; leave it null "
                        "(the default template then) or set it to 'default'")
    return _default_render if template is None else _jinja_renderer(template, tokenizer)


def render_conversation(conversation: Conversation, render) -> list[tuple[str, bool]]:
    """The conversation's text as pieces (text, trained): context pieces and the assistant turns' pieces, in order;
    joined they are the template's rendering of the whole conversation."""
    messages = conversation.as_dicts()
    pieces, done = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = render(messages[:index], True)
        turn = render(messages[:index + 1], False)
        if not context.startswith(done) or not turn.startswith(context):
            raise DataError("the chat template's rendering of a conversation's first turns is not the start of its "
                            "rendering of more turns, so the response tokens cannot be told apart; set "
                            "data.chat_template: default")
        pieces += [(context[len(done):], False), (turn[len(context):], True)]
        done = turn
    whole = render(messages, False)
    if not whole.startswith(done):
        raise DataError("the chat template's rendering of a conversation does not start with its rendering of the "
                        "turns before the last; set data.chat_template: default")
    if len(whole) > len(done):
        pieces.append((whole[len(done):], False))
    return [(text, trained) for text, trained in pieces if text]


def encode_plain(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a piece of text with no special tokens added (the template writes them as text)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text)


def tokenize_conversation(conversation: Conversation, tokenizer: Tokenizer, render) -> tuple[Tensor, Tensor]:
    """(token ids, loss mask) of one conversation: the mask is True at the assistant turns' tokens."""
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in render_conversation(conversation, render):
        piece = encode_plain(tokenizer, text)
        ids += piece
        mask += [trained] * len(piece)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


class InstructSplit(PackedSplit):
    """Packed rows of conversations with their ``loss_mask`` (1 where the token is a response token to predict):
    ``take`` gives {"tokens", "document_ids", "position_ids", "loss_mask"}."""

    def __init__(self, rows: PackedRows, loss_mask: Tensor):
        super().__init__(rows)
        self.tensors["loss_mask"] = loss_mask.to(torch.int8)


def lay_out(tokens: list[Tensor], masks: list[Tensor], row_len: int, *, pack: bool, pad_id: int = 0
            ) -> tuple[PackedRows, Tensor]:
    """The rows, and the loss mask laid out by the same placement (the layout depends only on the lengths and the
    seed, so packing the masks as documents puts every mask value beside its token)."""
    if pack:
        rows = pack_documents(tokens, row_len, seed=PACKING_SEED, pad_id=pad_id)
        laid = pack_documents([m.long() for m in masks], row_len, seed=PACKING_SEED, pad_id=0)
    else:
        rows = one_document_per_row(tokens, row_len, pad_id=pad_id)
        laid = one_document_per_row([m.long() for m in masks], row_len, pad_id=0)
    assert torch.equal(rows.document_ids, laid.document_ids)
    return rows, laid.tokens.bool() & (rows.document_ids >= 0)


def instruct_bundle(config, tokenizer: Tokenizer | None = None) -> DataBundle:
    """``data.source: instruct``: ``data.path``'s conversations, every k-th held out for validation (k = round(1 /
    data.valid_fraction)), in rows of ``data.seq_len + 1`` tokens. ``tokenizer`` is the starting model's
    (``model.from``); without one, data.tokenizer's is built on the training conversations' text."""
    from formerkit.data.text import make_tokenizer, split_documents

    path = existing_path(config)
    if not path.is_file():
        raise DataError(f"data.path {str(path)!r}: expected a JSON-lines file, found a folder "
                        "(data.source='instruct')")
    conversations = read_conversations(path, config.max_bytes)
    train, valid = split_documents(conversations, config.valid_fraction)
    if tokenizer is None:
        render = _default_render if config.chat_template in (None, "default") else None
        if render is None:
            raise DataError("data.chat_template 'tokenizer' needs the starting model's tokenizer (model.from); "
                            "the tokenizers data.tokenizer builds have no template")
        texts = ["".join(text for text, _ in render_conversation(c, render)).encode("utf-8") for c in train]
        tokenizer = make_tokenizer(config, texts)
    render = renderer(tokenizer, config.chat_template)
    row_len = config.seq_len + 1

    def split(items: list[Conversation], name: str) -> tuple[InstructSplit, str]:
        encoded = []
        for number, conversation in enumerate(items):
            try:
                encoded.append(tokenize_conversation(conversation, tokenizer, render))
            except DataError as error:
                raise DataError(f"{path}: {name} conversation {number + 1}: {error}") from error
            except Exception as error:  # a template's own error (raise_exception, an undefined variable)
                raise DataError(f"{path}: {name} conversation {number + 1}: the chat template failed ({error})"
                                ) from error
        rows, mask = lay_out([t for t, _ in encoded], [m for _, m in encoded], row_len, pack=config.pack)
        cut = f"; {rows.split_documents} longer than a row cut into pieces" if rows.split_documents else ""
        note = (f"{len(items)} {name} conversations in {len(rows.tokens):,} rows of {row_len} ({int(mask.sum()):,} "
                f"response tokens of {rows.real_tokens:,}{cut})")
        return InstructSplit(rows, mask), note

    train_split, train_note = split(train, "training")
    valid_split, valid_note = split(valid, "validation") if valid else (None, "")
    template = "the tokenizer's chat template" if chat_template(tokenizer, config.chat_template) else \
        "the default chat template"
    return DataBundle(
        train=train_split, valid=valid_split, test=None,
        model_fields={"vocab_size": tokenizer.vocab_size, "max_seq_len": config.seq_len},
        preprocessing={"tokenizer": tokenizer.describe(), "seq_len": config.seq_len, "packed": True,
                       "instruct": {"template": "tokenizer" if "tokenizer's" in template else "default"}},
        tokenizer=tokenizer, unit="tokens",
        description=f"instruct {path} ({template}): {train_note}" + (f", {valid_note}" if valid_note else ""))
