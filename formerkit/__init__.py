"""formerkit: compact, customizable, efficient Transformers.

    import formerkit
    model = formerkit.create_model("char_gpt")            # a preset
    config = model.config.replace(num_layers=2)           # configs are validated, frozen values
    small = formerkit.build_model(config)
    formerkit.save(small, "out/small"); same = formerkit.load("out/small")
    gpt2 = formerkit.from_hf("path/to/hf-gpt2")           # a local Hugging Face checkpoint directory
    predictor = formerkit.load_run("runs/digits")         # a trained run, its tokenizer and preprocessing
    predictor("seven.png")                                # raw input -> label and probabilities (see formerkit.predict)
"""

from formerkit.adapt import (
    add_adapters,
    load_adapters,
    merge_adapters,
    parameter_counts,
    save_adapters,
    set_adapter,
    use_adapter,
)
from formerkit.checkpoint import load, load_config, load_extra, save
from formerkit.config import (
    AttentionConfig,
    FeedForwardConfig,
    HeadConfig,
    ModelConfig,
    NormConfig,
    PositionConfig,
    StemConfig,
)
from formerkit.errors import (
    CheckpointError,
    ConfigError,
    FormerkitError,
    InputError,
    InteropError,
    UnknownFieldError,
)
from formerkit.interop import from_hf, to_hf
from formerkit.models import (
    MAEOutput,
    MaskedAutoencoder,
    ModelOutput,
    Transformer,
    build_model,
    create_model,
    finetune_model,
    list_models,
    model_config,
    register_model,
)
from formerkit.nn.masks import (
    CausalMask,
    DocumentMask,
    KeyPaddingMask,
    Mask,
    PrefixLMMask,
    SlidingWindowMask,
    TensorMask,
)
from formerkit.summary import Summary, count_parameters, summarize
from formerkit.version import __version__


def load_run(target):
    """A trained run (or a model directory a run saved) with its tokenizer and preprocessing, called with raw inputs:
    image files, PIL images or arrays -> labels and probabilities; text -> generated text; a CSV or recent values ->
    forecasts. See ``formerkit.predict.Predictor`` (``formerkit.load`` loads the bare model)."""
    from formerkit.predict import Predictor  # imported when called: it brings the training and data modules

    return Predictor(target)


__all__ = [
    "AttentionConfig", "CausalMask", "CheckpointError", "ConfigError", "DocumentMask", "FeedForwardConfig",
    "FormerkitError", "HeadConfig", "InputError", "InteropError", "KeyPaddingMask", "MAEOutput", "Mask",
    "MaskedAutoencoder", "ModelConfig", "ModelOutput", "NormConfig", "PositionConfig", "PrefixLMMask",
    "SlidingWindowMask", "StemConfig", "Summary", "TensorMask", "Transformer", "UnknownFieldError", "__version__",
    "add_adapters", "build_model", "count_parameters", "create_model", "finetune_model", "from_hf", "list_models",
    "load", "load_adapters", "load_config", "load_run", "load_extra", "merge_adapters", "model_config",
    "parameter_counts", "register_model", "save", "save_adapters", "set_adapter", "summarize", "to_hf", "use_adapter",
]
