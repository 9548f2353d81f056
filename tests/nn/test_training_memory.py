"""What a training pass keeps, made smaller without changing the gradients: norms' outputs recomputed for the backward
pass (formerkit.nn.recompute), the MLP's hidden activation recomputed and its derivative written in place in the
backward pass, the hidden activation by blocks (rows in the forward pass, columns in the backward pass) and fc_in's
output overwritten by its gradient (formerkit.nn.feedforward). Each against the plain computation in float64."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import formerkit.models.transformer as transformer_module
import formerkit.nn.block as block_module
import formerkit.nn.feedforward as feedforward_module
from formerkit.models.registry import create_model
from formerkit.nn import recompute
from formerkit.nn.feedforward import MLP


def _plain(monkeypatch):
    """The computation before these changes: norms' outputs kept, the MLP's activation derivative in a tensor of its
    own."""
    monkeypatch.setattr(block_module, "recomputed_norm_output", lambda *args: contextlib.nullcontext())
    monkeypatch.setattr(transformer_module, "recomputed_norm_output", lambda *args: contextlib.nullcontext())
    monkeypatch.setattr(feedforward_module, "_derivative_in_place",
                        lambda name, grad, h: feedforward_module._DERIVATIVES[name](grad, h))
    monkeypatch.setattr(feedforward_module, "_by_columns", lambda *args: False)
    monkeypatch.setattr(feedforward_module, "_block_count", lambda hidden, width: 1)


def _gpt(randomize, **overrides):
    model = create_model("gpt2", width=16, num_layers=2, num_heads=2, vocab_size=11, max_seq_len=12, **overrides)
    return randomize(model.double(), 0)


def _loss_and_grads(model, tokens):
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), grads


@pytest.mark.parametrize("overrides", [{}, {"norm.kind": "rmsnorm", "feedforward.activation": "swiglu"}])
def test_a_decoder_trains_to_the_plain_gradients(randomize, monkeypatch, overrides):
    model = _gpt(randomize, **overrides)
    tokens = torch.randint(0, 11, (3, 11), generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_grads(model, tokens)
    with monkeypatch.context() as plain:
        _plain(plain)
        reference_loss, reference = _loss_and_grads(model, tokens)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-13, atol=1e-13)
    for got, expected in zip(grads, reference):
        torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-12)


def test_the_norms_outputs_are_rebuilt_not_kept(randomize, monkeypatch):
    """Every projection that reads a norm's output saves the recipe instead (qkv and fc_in in each block, the head),
    and the backward pass rebuilds it, bit for bit what the forward computed."""
    model = _gpt(randomize)
    rebuilt, kept = [], []
    pack, unpack = recompute._NormOutput.pack, recompute._NormOutput.unpack

    def counting_pack(self, tensor):
        packed = pack(self, tensor)
        (rebuilt if isinstance(packed, recompute._Rebuilt) else kept).append(tensor)
        return packed

    def checking_unpack(self, packed):
        tensor = unpack(self, packed)
        if isinstance(packed, recompute._Rebuilt):
            with torch.no_grad():
                assert torch.equal(tensor, self.norm(self.x).as_strided(packed.size, packed.stride, packed.offset))
        return tensor

    monkeypatch.setattr(recompute._NormOutput, "pack", counting_pack)
    monkeypatch.setattr(recompute._NormOutput, "unpack", checking_unpack)
    tokens = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(2))
    _loss_and_grads(model, tokens)
    assert len(rebuilt) == 2 * 2 + 1
    with torch.no_grad():  # (no pass under evaluation records anything)
        model(tokens)
    assert len(rebuilt) == 5


def test_steps_aside_under_other_hooks_autocast_and_without_gradients():
    norm = torch.nn.LayerNorm(4)
    x = torch.randn(3, 4, requires_grad=True)
    y = norm(x)
    assert isinstance(recompute.recomputed_norm_output(norm, x, y), torch.autograd.graph.saved_tensors_hooks)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert isinstance(recompute.recomputed_norm_output(norm, x, y), contextlib.nullcontext)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert isinstance(recompute.recomputed_norm_output(norm, x, y), contextlib.nullcontext)
    with torch.no_grad():
        assert isinstance(recompute.recomputed_norm_output(norm, x, norm(x)), contextlib.nullcontext)
    assert isinstance(recompute.recomputed_norm_output(norm, x, y[:, :2]), contextlib.nullcontext)


def test_a_norm_changed_in_place_before_backward_is_refused():
    norm = torch.nn.LayerNorm(4)
    linear = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4, requires_grad=True)
    y = norm(x)
    with recompute.recomputed_norm_output(norm, x, y):
        out = linear(y)
    with torch.no_grad():
        norm.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


@pytest.mark.parametrize("hidden", [8, 30])
@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "relu", "squared_relu"])
def test_mlp_recomputed_with_in_place_derivative_gives_autograds_gradients(name, hidden):
    """The recomputing MLP against autograd through the plain forward: whole (hidden 8 = 4/3 x width) and by blocks
    (hidden 30: three blocks of 10 rows forward and 10 columns backward)."""
    torch.manual_seed(0)
    module = MLP(6, hidden, name).double()
    module.by_blocks = True  # as the last depth's MLP
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(10, 6, dtype=torch.float64)
    out = module(x)
    assert "Recomputed" in type(out.grad_fn).__name__
    grads = torch.autograd.grad(out, [x, *module.parameters()], upstream)
    module.recompute = False
    expected = module(x)
    reference = torch.autograd.grad(expected, [x, *module.parameters()], upstream)
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_summarys_count_leaves_out_the_recomputed_norm_outputs(randomize, monkeypatch):
    """saved_activation_bytes (the summary's training memory) counts what a training step keeps: the plain count less
    one norm output (batch x tokens x width floats) per sub-layer and the final norm's -- on real tensors and on the
    meta device alike."""
    from formerkit.summary import saved_activation_bytes

    model = _gpt(randomize).float()
    tokens = torch.randint(0, 11, (3, 10), generator=torch.Generator().manual_seed(3))
    counted = saved_activation_bytes(model.train(), tokens)
    with monkeypatch.context() as plain:
        _plain(plain)
        plain_count = saved_activation_bytes(model, tokens)
    norm_outputs = (2 * 2 + 1) * tokens.numel() * 16 * 4
    assert plain_count - counted == norm_outputs
    with torch.device("meta"):
        meta = _gpt(lambda module, seed: module).float()
    assert saved_activation_bytes(meta.train(), tokens.to("meta")) == counted


def test_one_rerun_of_a_norm_serves_every_operation_that_saved_its_output(randomize):
    """LoRA on q and v saves the attention norm's output twice (both LoRA inputs; the frozen base projection keeps
    none): the backward pass reruns that norm once, and the gradients are those of the model without the recompute
    path."""
    import formerkit

    model = _gpt(randomize, **{"norm.kind": "rmsnorm"})
    formerkit.add_adapters(model, method="lora", targets=("q", "v"), rank=2, alpha=4)
    for name, parameter in model.named_parameters():
        if "lora" in name:
            parameter.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    norms = [module for name, module in model.named_modules() if name.endswith("attention_residual.norm")]
    assert len(norms) == 2
    reruns = []
    for norm in norms:
        norm.register_forward_hook(lambda module, args, out: reruns.append(module) if not torch.is_grad_enabled()
                                   else None)
    tokens = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(4))
    trained = [p for p in model.parameters() if p.requires_grad]
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, trained)
    # The second layer's norm reran once. (The first layer's output needs no gradient -- frozen embeddings, frozen
    # norm -- so LoRA keeps it as it is and nothing reruns.)
    assert [id(module) for module in reruns] == [id(norms[1])]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # the recompute path steps aside
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1))
        reference = torch.autograd.grad(loss, trained)
    for got, expected in zip(grads, reference):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("shared", [None, 2])
def test_only_the_last_depths_mlp_goes_by_blocks(shared):
    """Blocks cost time and lower the peak only where the hidden activation is at the top of the memory: the MLP of
    the last depth (with shared weights, the block that runs there). The others make fc_out's product whole."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = create_model("gpt2", width=16, num_layers=4, num_heads=2, vocab_size=11, max_seq_len=12,
                         num_unique_layers=shared)
    stack = model.decoder
    last = stack.block_at(stack.num_layers - 1)
    assert [block.feedforward.by_blocks for block in stack.blocks] == [block is last for block in stack.blocks]

    class FcOutRows(TorchDispatchMode):  # the rows of each product into the width (fc_out's)
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "addmm" and args[2].shape[-1] == 16:
                self.rows.append(args[1].shape[0])
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 5, 16, requires_grad=True)
    for block, expected in [(stack.blocks[0], [10]), (last, [5, 5])]:  # hidden 64 = 2 x twice the width: 2 blocks
        with FcOutRows() as mode:
            block.feedforward(x)
        assert mode.rows == expected


def _mlp_and_input(hidden=40, width=8, dtype=torch.float64):
    torch.manual_seed(0)
    module = MLP(width, hidden, "gelu").to(dtype)
    module.by_blocks = True  # as the last depth's MLP
    x = torch.randn(3, 7, width, dtype=dtype, requires_grad=True)
    return module, x, torch.randn(3, 7, width, dtype=dtype)


def _plain_grads(module, x, upstream):
    module.recompute = False
    try:
        return torch.autograd.grad(module(x), [x, *module.parameters()], upstream)
    finally:
        module.recompute = True


def test_the_backward_pass_writes_fc_ins_gradient_over_its_output():
    """The gradient fc_in's backward receives is fc_in's output's own storage (no hidden-sized tensor made), and the
    gradients are autograd's."""
    module, x, upstream = _mlp_and_input()
    out = module(x)
    node = out.grad_fn
    while "Recomputed" not in type(node).__name__:
        node = node.next_functions[0][0]
    saved = node.saved_tensors[0].untyped_storage().data_ptr()  # fc_in's output, flat
    received = []
    node.register_hook(lambda grads_in, grads_out: received.append(grads_in[0].untyped_storage().data_ptr()))
    grads = torch.autograd.grad(out, [x, *module.parameters()], upstream)
    assert received == [saved]
    for got, want in zip(grads, _plain_grads(module, x, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_retained_graph_keeps_fc_ins_output_for_a_second_backward_pass():
    module, x, upstream = _mlp_and_input()
    out = module(x)
    first = torch.autograd.grad(out, [x, *module.parameters()], upstream, retain_graph=True)
    second = torch.autograd.grad(out, [x, *module.parameters()], upstream)
    freed = torch.autograd.grad(module(x), [x, *module.parameters()], upstream)  # h overwritten this time
    reference = _plain_grads(module, x, upstream)
    for a, b, c, want in zip(first, second, freed, reference):
        torch.testing.assert_close(a, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, want, rtol=1e-12, atol=1e-12)
        assert torch.equal(a, c)  # the same arithmetic whether h is overwritten or not


def test_fc_ins_output_held_by_a_hook_or_under_checkpointing_is_left_as_it_is():
    """A forward hook on fc_in may keep its output (activation capture): the backward pass leaves it unchanged. Under
    activation checkpointing the saved tensor is a recomputation: the gradients stay autograd's."""
    module, x, upstream = _mlp_and_input()
    kept = []
    handle = module.fc_in.register_forward_hook(lambda linear, args, out: kept.append(out.detach().clone()) or
                                                kept.append(out))
    out = module(x)
    torch.autograd.grad(out, [x, *module.parameters()], upstream)
    torch.testing.assert_close(kept[1], kept[0], rtol=0, atol=0)
    handle.remove()
    out = torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
    grads = torch.autograd.grad(out, [x, *module.parameters()], upstream)
    for got, want in zip(grads, _plain_grads(module, x, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_forward_pass_by_blocks_of_rows_equals_the_whole_product_bit_for_bit():
    """Training's forward (by blocks of rows) and evaluation's (whole) give the same outputs, to the bit."""
    module, x, _ = _mlp_and_input(hidden=64, width=16, dtype=torch.float32)
    assert feedforward_module._block_count(64, 16) == 2
    out = module(x)
    assert "Recomputed" in type(out.grad_fn.next_functions[0][0]).__name__  # (below the reshape to [3, 7, 16])
    with torch.no_grad():
        assert torch.equal(out, module(x))


def test_lora_on_fc_in_and_fc_out_by_blocks_gives_the_plain_gradients(randomize, monkeypatch):
    import formerkit

    model = _gpt(randomize)
    formerkit.add_adapters(model, method="lora", targets=("fc_in", "fc_out"), rank=2, alpha=4)
    for name, parameter in model.named_parameters():
        if "lora" in name:
            parameter.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    trained = [p for p in model.parameters() if p.requires_grad]
    tokens = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(5))

    def grads():
        logits = model(tokens[:, :-1])
        return torch.autograd.grad(F.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1)), trained)

    got = grads()
    with monkeypatch.context() as plain:
        _plain(plain)
        reference = grads()
    for a, want in zip(got, reference):
        torch.testing.assert_close(a, want, rtol=1e-12, atol=1e-13)
