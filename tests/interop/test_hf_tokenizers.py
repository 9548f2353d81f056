"""Tokenizers and generation configs travel with the weights: Hugging Face tokenizers read exactly as
``transformers.AutoTokenizer`` reads them, formerkit's own written so that it reads them with formerkit's ids, and text
generation on converted and exported checkpoints equal on both sides. Every tokenizer is built here with the
``tokenizers`` library; nothing is downloaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import formerkit
from formerkit.data.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, load_tokenizer, save_tokenizer
from formerkit.errors import InteropError
from formerkit.interop import convert, read_hf_tokenizer, write_hf_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = ["Hello world, this is a tiny corpus.", "def f(x):\n    return x + 1\n", "Ünïcödé text — ok? ✓ 日本",
          "The quick brown fox jumps over the lazy dog.\n\n\tIndented line.\r\n"] * 4
TEXTS = ["Hello world", "def g(y):\n\n    return y\n", "héllo — ✓ 日本語 😀", "\n\n\n", "", "a </s> b <s>", "   x  "]
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def _bpe(post_processor: str | None):
    """A byte-level BPE trained on CORPUS with <s>, </s>, <pad> at ids 0-2; ``post_processor``: "bos" adds <s> in
    front of every text, "bos_eos" <s> and </s> around it, None adds nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if post_processor == "bos":
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                               special_tokens=[("<s>", 0)])
    elif post_processor == "bos_eos":
        backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> $B </s>",
                                                               special_tokens=[("<s>", 0), ("</s>", 1)])
    return backend


def _wordpiece():
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP], lower-cased)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return backend


def _save_tokenizer(backend, directory, **options):
    """``backend`` saved as transformers saves a fast tokenizer (tokenizer.json, tokenizer_config.json, the chat
    template in its own file)."""
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **options)
    fast.chat_template = TEMPLATE
    fast.save_pretrained(directory)
    return directory


_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
TOKENIZER_CASES = {
    "bpe-bos-by-post-processor": (lambda: _bpe("bos"), _SPECIALS),
    "bpe-no-bos": (lambda: _bpe(None), _SPECIALS),
    "bpe-bos-and-eos": (lambda: _bpe("bos_eos"), _SPECIALS),
    "bpe-bos-by-add-bos-token": (lambda: _bpe(None), dict(_SPECIALS, add_bos_token=True)),
    "wordpiece-cls-sep": (_wordpiece, {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                                       "sep_token": "[SEP]"}),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_an_hf_tokenizer_encodes_and_decodes_as_autotokenizer(case, tmp_path):
    make, options = TOKENIZER_CASES[case]
    directory = _save_tokenizer(make(), tmp_path / "hf", **options)
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    ours = read_hf_tokenizer(directory)
    save_tokenizer(ours, tmp_path / "saved.json")  # as a converted checkpoint keeps it
    saved = load_tokenizer(tmp_path / "saved.json")
    for text in TEXTS:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text) == expected, text
        assert saved.encode(text) == expected, text
        assert ours.decode(expected) == theirs.decode(expected, skip_special_tokens=True), text
    if case.startswith("bpe-bos"):
        assert ours.encode("x")[0] == 0, "the BOS the checkpoint adds is there"
    assert saved.chat_template == TEMPLATE
    # Labels (inspect, report) name special tokens, which decoding drops, and are the text of the others.
    first = ours.encode("Hello")[0]
    expected_label = theirs.convert_ids_to_tokens(first) if first in theirs.all_special_ids else theirs.decode([first])
    assert ours.token_label(first) == expected_label != ""


@pytest.mark.parametrize("cls, options", [
    ("GPT2Tokenizer", {}), ("GPT2Tokenizer", {"add_bos_token": True, "bos_token": "<s>"}), ("Qwen2Tokenizer", {}),
    ("LlamaTokenizer", {}), ("LlamaTokenizer", {"add_bos_token": True}),
])
def test_tokenizers_of_transformers_own_classes_encode_as_autotokenizer(cls, options, tmp_path):
    """transformers 5 rebuilds some classes' pipelines from the vocabulary (GPT-2's, Qwen2's regex, LLaMA's
    metaspace); a tokenizer.json such a class wrote reads back the same here."""
    model = json.loads(_bpe(None).to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in model["merges"]]
    getattr(transformers, cls)(vocab=dict(model["vocab"]), merges=merges, **options).save_pretrained(tmp_path)
    theirs, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), read_hf_tokenizer(tmp_path)
    for text in TEXTS:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == theirs.decode(expected, skip_special_tokens=True), text


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), CharTokenizer.train(CORPUS)], ids=["byte", "char"])
def test_formerkit_tokenizers_are_written_so_autotokenizer_gives_their_ids(tokenizer, tmp_path):
    write_hf_tokenizer(tokenizer, tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    # ASCII, non-ASCII (multi-byte UTF-8, characters the char tokenizer never saw), newline- and space-heavy text.
    texts = TEXTS + ["".join(CORPUS), "\r\n\t \n  \n\n x"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == tokenizer.decode(ids), text
        assert read_hf_tokenizer(tmp_path).encode(text) == ids, text
    if isinstance(tokenizer, ByteTokenizer):
        assert theirs("é")["input_ids"] == [0xC3, 0xA9]
    else:
        assert theirs("@")["input_ids"] == [tokenizer.unknown_id]  # unseen: the last id, decoded as U+FFFD
        assert theirs.decode([tokenizer.unknown_id]) == "\ufffd"


@pytest.mark.parametrize("files", [["tokenizer.model"], ["vocab.txt"], ["vocab.json", "merges.txt"]])
def test_a_slow_only_tokenizer_is_refused_naming_what_was_found_and_what_is_needed(files, tmp_path):
    for name in files:
        (tmp_path / name).write_text("{}")
    with pytest.raises(InteropError, match=r"tokenizer is in " + ", ".join(files) + r".*reads the tokenizers "
                                           r"library's tokenizer\.json.*save_pretrained"):
        read_hf_tokenizer(tmp_path)


# ----- converted checkpoints -----


def _llama(directory, tokenizer_dir, generation: dict | None, seed: int = 0):
    """A tiny random LLaMA (vocab 320 + 3 spare rows, GQA) with the tokenizer of ``tokenizer_dir`` beside it."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=323, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=2, rope_theta=5000.0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init: varied greedy text
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.3)
    model.eval().save_pretrained(directory)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, directory / path.name)
    (directory / "generation_config.json").unlink(missing_ok=True)
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return model


@pytest.fixture
def bpe_dir(tmp_path):
    return _save_tokenizer(_bpe("bos"), tmp_path / "tokenizer", **_SPECIALS)


def _hf_greedy(model, tokenizer, prompt: str, count: int, eos) -> list[int]:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, do_sample=False,
                         eos_token_id=eos, pad_token_id=2)
    return out[0, ids.shape[1]:].tolist()


def test_convert_from_hf_keeps_the_tokenizer_chat_template_and_generation_config(bpe_dir, tmp_path):
    generation = {"bos_token_id": 0, "eos_token_id": [1, 7], "pad_token_id": 2, "do_sample": True,
                  "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 33}
    _llama(tmp_path / "hf", bpe_dir, generation)
    result = convert(tmp_path / "hf", tmp_path / "fk", direction="from_hf")
    assert result["tokenizer"] == "hf"
    from formerkit.runs import generation_defaults, load_run_tokenizer

    tokenizer = load_run_tokenizer(tmp_path / "fk")
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.chat_template == TEMPLATE
    assert (tokenizer.special_id("bos_token"), tokenizer.special_id("eos_token")) == (0, 1)
    extra = formerkit.load_extra(tmp_path / "fk")
    assert extra["generation"] == generation and extra["objective"] == "causal_lm"
    assert extra["imported"]["model_type"] == "llama"
    assert generation_defaults(extra, tokenizer) == {"max_new_tokens": 33, "temperature": 0.6, "top_k": 50,
                                                     "top_p": 0.9, "stop_tokens": [1, 7]}


def test_generate_on_a_converted_checkpoint_stops_at_its_eos_as_transformers_does(bpe_dir, tmp_path, capsys):
    from formerkit.cli import main
    from formerkit.runs import generate_run

    hf_model = _llama(tmp_path / "hf", bpe_dir, None)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    free = _hf_greedy(hf_model, hf_tokenizer, "Hello world", 20, None)
    eos = free[6]  # a token greedy decoding reaches: the checkpoint's second end-of-sequence id
    assert eos not in free[:6]
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, eos]}))
    expected = _hf_greedy(hf_model, hf_tokenizer, "Hello world", 20, [1, eos])
    assert expected == free[:7], "transformers stops at the eos token, which it keeps"
    convert(tmp_path / "hf", tmp_path / "fk", direction="from_hf")
    # The generation config has no do_sample: greedy, as in transformers.
    text = "".join(generate_run(tmp_path / "fk", "Hello world", max_new_tokens=20))
    prompt = hf_tokenizer("Hello world")["input_ids"]
    shown = hf_tokenizer.decode(prompt, skip_special_tokens=True)
    assert text == hf_tokenizer.decode(prompt + expected, skip_special_tokens=True)[len(shown):]
    assert main(["generate", str(tmp_path / "fk"), "--prompt", "Hello world"]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_serve_on_a_converted_checkpoint_stops_at_its_eos(bpe_dir, tmp_path):
    pytest.importorskip("fastapi")
    import asyncio

    import httpx

    from formerkit.serve import ModelService, create_app

    hf_model = _llama(tmp_path / "hf", bpe_dir, None)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    free = _hf_greedy(hf_model, hf_tokenizer, "Hello", 12, None)
    eos = free[4]
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    convert(tmp_path / "hf", tmp_path / "fk", direction="from_hf")
    expected = free[:free.index(eos) + 1]

    async def call():
        transport = httpx.ASGITransport(app=create_app(ModelService(tmp_path / "fk")))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/generate", json={"prompt": "Hello", "max_new_tokens": 12,
                                                           "temperature": 0})

    answer = asyncio.run(call()).json()
    assert answer["num_tokens"] == len(expected)
    assert answer["text"] == hf_tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.slow
def test_inspect_report_and_predict_take_text_on_a_converted_checkpoint(bpe_dir, tmp_path):
    from formerkit.inspection import inspect_run
    from formerkit.train.html_report import write_report

    _llama(tmp_path / "hf", bpe_dir, {"eos_token_id": 1})
    convert(tmp_path / "hf", tmp_path / "fk", direction="from_hf")
    inspection, paths = inspect_run(tmp_path / "fk", text="Hello world", out=tmp_path / "inspect")
    assert paths and all(path.exists() for path in paths)
    page = write_report(tmp_path / "fk", tmp_path / "report.html", samples=8).read_text()
    assert "llama" in page and "Samples" in page
    predictor = formerkit.load_run(tmp_path / "fk")
    assert predictor.task == "generate"
    assert isinstance(predictor("Hello", max_new_tokens=5), str)
    with pytest.raises(formerkit.errors.CheckpointError, match="converted from another format"):
        from formerkit.runs import evaluate_run

        evaluate_run(tmp_path / "fk")


def _pipeline_text(directory, prompt: str, count: int) -> str:
    pipe = transformers.pipeline("text-generation", model=str(directory))
    out = pipe(prompt, max_new_tokens=count, do_sample=False)[0]["generated_text"]
    assert out.startswith(prompt)
    return out[len(prompt):]


def test_pipeline_on_an_exported_imported_llama_generates_formerkit_text(bpe_dir, tmp_path):
    from formerkit.runs import generate_run

    _llama(tmp_path / "hf", bpe_dir, {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2})
    convert(tmp_path / "hf", tmp_path / "fk", direction="from_hf")
    result = convert(tmp_path / "fk", tmp_path / "back", direction="to_hf")
    assert result["tokenizer"] == "hf"
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["eos_token_id"] == 1
    assert json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    ours = "".join(generate_run(tmp_path / "fk", "Hello world", max_new_tokens=16, temperature=0))
    assert _pipeline_text(tmp_path / "back", "Hello world", 16) == ours
    assert _pipeline_text(tmp_path / "hf", "Hello world", 16) == ours


def test_to_hf_takes_a_tokenizer_from_python(tmp_path, randomize):
    model = randomize(formerkit.create_model("llama_tiny", width=32, num_layers=1, num_heads=2, vocab_size=256,
                                             max_seq_len=64), seed=3)
    formerkit.to_hf(model, tmp_path, tokenizer=ByteTokenizer())
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs("héllo\n")["input_ids"] == list("héllo\n".encode())
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"do_sample": True, "temperature": 0.8, "top_k": 0, "max_new_tokens": 200}
    with pytest.raises(InteropError, match="tokenizer: expected a formerkit tokenizer"):
        formerkit.to_hf(model, tmp_path / "other", tokenizer="byte")


# ----- shipped recipes -----

# The shipped language-model recipes that export (char-lm-long's experts do not): char-lm's bytes, jsonl-lm's, and
# text-folder's char and bpe options.
RECIPE_RUNS = {
    "char-lm-byte": ("char-lm", {}),
    "jsonl-lm-byte": ("jsonl-lm", {}),
    "text-folder-char": ("text-folder", {"data.tokenizer": "char"}),
    "text-folder-bpe": ("text-folder", {"data.tokenizer": "bpe", "data.vocab_size": 300}),
}


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A folder of 24 text files and a JSON-lines file of the same 24 documents."""
    folder = tmp_path_factory.mktemp("texts")
    documents = [f"Document {index}: {CORPUS[index % 4]}\n" * 12 for index in range(24)]
    for index, document in enumerate(documents):
        (folder / f"{index}.txt").write_text(document)
    (folder.parent / "texts.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RECIPE_RUNS))
def test_pipeline_on_an_exported_recipe_run_generates_formerkit_text(case, trained_run, text_folder, randomize,
                                                                     tmp_path):
    from formerkit.runs import generate_run, load_run_model, load_run_tokenizer

    recipe, extra = RECIPE_RUNS[case]
    if recipe in ("text-folder", "jsonl-lm"):
        path = text_folder if recipe == "text-folder" else text_folder.parent / "texts.jsonl"
        extra = dict(extra, **{"data.path": str(path)})
    run = trained_run(recipe, **extra)
    # The trained tiny run, and a copy with random weights (a 6-step run mostly repeats one token).
    model, _, saved = load_run_model(run)
    formerkit.save(randomize(model, seed=5), tmp_path / "random", extra=saved)
    shutil.copy(run / "model" / "tokenizer.json", tmp_path / "random" / "tokenizer.json")
    tokenizer = load_run_tokenizer(run)
    for source in (run, tmp_path / "random"):
        out = tmp_path / f"hf-{source.name}"
        result = convert(source, out, direction="to_hf")
        assert result["architecture"] == "GPTNeoXForCausalLM" and result["tokenizer"] == tokenizer.kind
        ids = transformers.AutoTokenizer.from_pretrained(out)(CORPUS[1])["input_ids"]
        assert ids == tokenizer.encode(CORPUS[1])
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        ours = formerkit.load(source if source.name == "random" else source / "model").eval()
        with torch.no_grad():
            difference = (theirs(torch.tensor([ids])).logits - ours(torch.tensor([ids]))).abs().max()
        assert difference < 1e-4
        for prompt in ("Document 3: ", "def f(x):\n"):
            ours_text = "".join(generate_run(source, prompt, max_new_tokens=12, temperature=0))
            assert _pipeline_text(out, prompt, 12) == ours_text


@pytest.mark.slow
def test_vit_digits_with_its_class_token_converts_to_vit_and_what_no_family_holds_is_refused_by_field(trained_run,
                                                                                                     tmp_path):
    from formerkit.runs import load_run_model

    # vit-digits averages its patch tokens; ViTForImageClassification reads the class token.
    with pytest.raises(InteropError, match=r"head\.pooling is 'mean' \(a ViTForImageClassification checkpoint holds "
                                           r"'cls'\)"):
        convert(trained_run("vit-digits"), tmp_path / "mean", direction="to_hf")
    run = trained_run("vit-digits", **{"model.pooling": "cls"})
    result = convert(run, tmp_path / "vit", direction="to_hf")
    assert result["architecture"] == "ViTForImageClassification"
    model, _, _ = load_run_model(run)
    images = torch.randn(3, 1, 8, 8)
    theirs = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "vit").eval()
    with torch.no_grad():
        difference = (theirs(pixel_values=images).logits - model(images)).abs().max()
    assert difference < 1e-4  # drop_path 0.1 (training only) is not written
    with pytest.raises(InteropError, match=r"stem\.kind='conv'"):
        convert(trained_run("cct-digits"), tmp_path / "cct", direction="to_hf")
