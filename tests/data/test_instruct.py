"""Instruction data: conversations rendered through a chat template, the loss on response tokens only, packing that
keeps the response boundary."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import formerkit
from formerkit.data import ByteTokenizer, build_data
from formerkit.data.base import DataError
from formerkit.data.instruct import (
    Conversation,
    InstructSplit,
    lay_out,
    read_conversations,
    renderer,
    tokenize_conversation,
)
from formerkit.train.config import DataConfig, ObjectiveConfig
from formerkit.train.objectives import make_objective

from ..conftest import char_hf_tokenizer, token_config

LINES = [
    {"prompt": "2+2?", "response": "4"},
    {"system": "be brief", "prompt": "hi", "response": "hello"},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "cc"}, {"role": "assistant", "content": "dd"}]},
    {"prompt": "name a colour", "response": "red"},
]


def write_jsonl(path, lines=LINES):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_default_template_renders_and_masks_only_the_responses():
    """The hand-built reference: the default template's text, with the bytes of each assistant turn's content and
    its end marker marked."""
    conversation = Conversation((("user", "a"), ("assistant", "b"), ("user", "cc"), ("assistant", "dd")))
    ids, mask = tokenize_conversation(conversation, ByteTokenizer(), renderer(ByteTokenizer()))
    pieces = [("<|user|>\na<|end|>\n<|assistant|>\n", False), ("b<|end|>\n", True),
              ("<|user|>\ncc<|end|>\n<|assistant|>\n", False), ("dd<|end|>\n", True)]
    expected_ids = [b for text, _ in pieces for b in text.encode()]
    expected_mask = [trained for text, trained in pieces for _ in text.encode()]
    assert ids.tolist() == expected_ids
    assert mask.tolist() == expected_mask


def test_the_loss_counts_only_response_tokens():
    """The objective's loss on a row equals the cross-entropy written out over the response positions alone."""
    tokenizer = ByteTokenizer()
    conversation = Conversation((("user", "hi"), ("assistant", "yo")))
    ids, mask = tokenize_conversation(conversation, tokenizer, renderer(tokenizer))
    rows, loss_mask = lay_out([ids], [mask], len(ids) + 3, pack=False)
    batch = InstructSplit(rows, loss_mask).take(torch.tensor([0]))
    torch.manual_seed(0)
    model = formerkit.build_model(token_config(vocab_size=256, max_seq_len=len(ids) + 2, num_heads=2)).eval()
    objective = make_objective(ObjectiveConfig(kind="causal_lm"), None)
    loss = objective.loss(model, batch, torch.Generator())
    with torch.no_grad():
        logits = model(ids[None, :-1])[0]
    # position j predicts token j + 1; it counts when token j + 1 is a response token
    chosen = mask[1:]
    reference = F.cross_entropy(logits[chosen], ids[1:][chosen])
    assert chosen.sum() == len("yo<|end|>\n")
    assert float(loss.detach()) == pytest.approx(float(reference), rel=1e-5)


def test_packing_keeps_each_response_boundary():
    tokenizer = ByteTokenizer()
    conversations = [Conversation((("user", "q" * n), ("assistant", "r" * (n + 1)))) for n in range(1, 9)]
    encoded = [tokenize_conversation(c, tokenizer, renderer(tokenizer)) for c in conversations]
    rows, mask = lay_out([t for t, _ in encoded], [m for _, m in encoded], 128, pack=True)
    assert len(rows.tokens) < len(conversations)  # several conversations share rows
    for document, start, row, column, length in rows.pieces.tolist():
        ids, expected = encoded[document]
        assert torch.equal(rows.tokens[row, column:column + length], ids[start:start + length])
        assert torch.equal(mask[row, column:column + length], expected[start:start + length])
    assert not mask[rows.document_ids < 0].any()  # padding is never a response


def test_instruct_source_reads_pairs_and_chats(tmp_path):
    config = DataConfig(source="instruct", path=str(write_jsonl(tmp_path / "chat.jsonl")), seq_len=96,
                        valid_fraction=0.25)
    bundle = build_data(config)
    assert len(bundle.train) == 3 and len(bundle.valid) == 1
    batch = bundle.train.take(torch.arange(3))
    texts = [bytes(t for t, m in zip(row.tolist(), mask.tolist()) if m).decode() for row, mask in
             zip(batch["tokens"], batch["loss_mask"])]
    assert texts == ["4<|end|>\n", "hello<|end|>\n", "b<|end|>\ndd<|end|>\n"]
    first = bytes(t for t in batch["tokens"][1].tolist() if t).decode()
    assert first == "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\nhello<|end|>\n"


class _TemplateTokenizer(ByteTokenizer):
    """A byte tokenizer with a chat template (as an HF tokenizer converted from a checkpoint has one)."""

    chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                     "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}[assistant]{% endif %}")

    def special_token(self, name):
        return {"bos_token": "^", "eos_token": "$"}.get(name)


def test_the_tokenizers_chat_template_is_rendered_with_jinja():
    tokenizer = _TemplateTokenizer()
    conversation = Conversation((("user", "hi"), ("assistant", "yo")))
    ids, mask = tokenize_conversation(conversation, tokenizer, renderer(tokenizer))
    assert bytes(ids.tolist()).decode() == "^[user]hi[assistant]yo$"
    assert bytes(t for t, m in zip(ids.tolist(), mask.tolist()) if m).decode() == "yo$"
    # data.chat_template: default ignores the tokenizer's
    ids, _ = tokenize_conversation(conversation, tokenizer, renderer(tokenizer, "default"))
    assert bytes(ids.tolist()).decode().startswith("<|user|>")


def test_an_hf_tokenizers_template_from_a_converted_checkpoint(tmp_path):
    """A tokenizer read from a Hugging Face directory keeps its chat_template; the instruct source renders it."""
    tokenizer, backend = char_hf_tokenizer(_TemplateTokenizer.chat_template)
    conversation = Conversation((("user", "hi"), ("assistant", "yo")))
    ids, mask = tokenize_conversation(conversation, tokenizer, renderer(tokenizer))
    bos, eos = backend.token_to_id("<s>"), backend.token_to_id("</s>")
    assert ids[0] == bos and ids[-1] == eos  # the template's special tokens, each one token
    assert [backend.id_to_token(i) for i, m in zip(ids.tolist(), mask.tolist()) if m] == ["y", "o", "</s>"]


@pytest.mark.parametrize("line, message", [
    ({"prompt": "x"}, "'response' must be a string"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\] must be"),
    ({"text": "x"}, "expected {\"prompt\", \"response\"}"),
])
def test_bad_lines_are_refused_naming_the_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [LINES[0], line])
    with pytest.raises(DataError, match=f"line 2: .*{message}"):
        read_conversations(path)
