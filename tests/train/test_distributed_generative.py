"""The generative objectives under torchrun: every process draws the noise, timesteps, masks and dropped labels of
the whole micro-batch from one shared stream and keeps its own rows (formerkit.data.base.RowDraws), so a DDP run of
dit-digits (flow matching) or maskgit-digits on 2 processes follows the single-process run, loss by loss, to the
same weights. The fast tests check the split itself: two processes' rows put together are one process's draws."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.distributed

import formerkit
from formerkit import build_model
from formerkit.config import ModelConfig
from formerkit.data.base import ProcessGenerator, RowDraws, step_generator
from formerkit.train import train

from ..conftest import tiny_overrides
from .test_distributed import _records, _run, _sets, _summary

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this PyTorch build")

STEPS = 4
# conftest's tiny runs, shortened; maskgit-digits also accumulates (2 micro-batches of 8 rows, 4 per process).
# Label and class dropout stay on: the dropped labels are drawn per example too.
RUNS = {
    "dit-digits": tiny_overrides("dit-digits", **{"schedule.steps": STEPS, "eval.every": STEPS,
                                                  "schedule.warmup_steps": 1}),
    "maskgit-digits": tiny_overrides("maskgit-digits", **{"schedule.steps": STEPS, "eval.every": STEPS,
                                                          "schedule.warmup_steps": 1, "schedule.grad_accum": 2}),
}


def _generator(rank: int, world: int, total: int) -> ProcessGenerator:
    """Process ``rank``'s generator the trainer's way: it has rows rank, rank + world, ... of the micro-batch."""
    return ProcessGenerator(rank + 100, RowDraws(step_generator(3, 1), torch.arange(total)[rank::world], total))


def _split(whole: RowDraws, world: int, draw) -> list[torch.Tensor]:
    """What each of ``world`` processes keeps of ``draw`` (a function of a RowDraws)."""
    return [draw(RowDraws.of(_generator(rank, world, whole.total), len(range(rank, whole.total, world))))
            for rank in range(world)]


def _rows(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    return {name: value[rank::world] for name, value in batch.items()}


def test_processes_rows_put_together_are_the_single_process_draws():
    def draw(draws):
        return torch.cat([draws.mine(draws.randn(3, 2)).flatten(1), draws.mine(draws.rand(1)),
                          draws.mine(draws.randint(50, 4)).float()], dim=1)

    whole = draw(RowDraws.of(step_generator(3, 1), 6))
    # The reference: plain torch draws of the whole micro-batch from the same seed, in the same order.
    reference = step_generator(3, 1)
    expected = torch.cat([torch.randn(6, 3, 2, generator=reference).flatten(1), torch.rand(6, 1, generator=reference),
                          torch.randint(50, (6, 4), generator=reference).float()], dim=1)
    assert torch.equal(whole, expected)
    first, second = _split(RowDraws(step_generator(3, 1), None, 6), 2, draw)
    assert torch.equal(first, whole[0::2]) and torch.equal(second, whole[1::2])


def test_the_process_generator_is_still_the_processes_own_stream():
    shared = RowDraws(step_generator(3, 1), torch.tensor([1]), 2)
    own = ProcessGenerator(7, shared)
    assert torch.equal(torch.rand(4, generator=own), torch.rand(4, generator=torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="3 rows"):
        RowDraws.of(own, 3)


@pytest.fixture(scope="module", params=sorted(RUNS))
def runs(request, tmp_path_factory):
    """(the DDP run's directory, the single-process result) of one recipe."""
    recipe, overrides = request.param, RUNS[request.param]
    out = tmp_path_factory.mktemp(f"ddp-{recipe}") / "run"
    _run([sys.executable, "-m", "formerkit.cli", "train", recipe, "--nproc", "2", "--out", str(out),
          *_sets(overrides)])
    return out, train(recipe, tmp_path_factory.mktemp(f"single-{recipe}") / "run", overrides=overrides)


@pytest.mark.slow
def test_ddp_of_a_generative_objective_follows_the_single_process_run(runs):
    run, single = runs
    assert _summary(run)["status"] == "completed"
    # One writer: one record per step.
    losses = [r["loss"] for r in _records(run)]
    expected = [r["loss"] for r in _records(single.run_dir)]
    assert len(losses) == len(expected) == STEPS
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(losses, expected)), (losses, expected)
    trained, reference = formerkit.load(run / "model").state_dict(), single.model.state_dict()
    assert trained.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.allclose(trained[name], value, atol=1e-5), name
    # The evaluation (rank 0) saw the same model too.
    evaluated, expected = _records(run, "eval"), _records(single.run_dir, "eval")
    assert [r["step"] for r in evaluated] == [r["step"] for r in expected] == [STEPS]
    assert math.isclose(evaluated[0]["test_loss"], expected[0]["test_loss"], rel_tol=1e-5)


def test_two_processes_losses_average_to_the_single_process_loss(randomize):
    # What DDP computes (the mean of the processes' gradients) is the single-process gradient exactly when the mean
    # of their losses is the single-process loss for every model: checked on fixed models, with the labels dropped.
    from .test_diffusion import normalized
    from .test_diffusion import objective as diffusion_objective
    from .test_masked_generation import generation_objective, tiny_model

    dit = build_model(ModelConfig(arch="encoder", width=16, num_layers=1, attention={"num_heads": 2},
                                  stem={"kind": "patches", "image_size": 8, "patch_size": 4, "in_channels": 1},
                                  position={"kind": "sincos2d"}, head={"kind": "patches"},
                                  condition={"kind": "adaln_zero", "timesteps": True, "classes": 10,
                                             "timestep_frequencies": 8, "label_dropout": 0.5}))
    images = {"inputs": normalized(16 * torch.rand(6, 1, 8, 8)), "labels": torch.arange(6)}
    masked = generation_objective(class_dropout=0.5)
    cases = [(diffusion_objective(kind), dit, images) for kind in ("flow_matching", "ddpm")]  # (wrapped twice)
    cases.append((masked, tiny_model(masked), masked.bundle.train.take(torch.arange(6))))
    for objective, model, batch in cases:
        model = randomize(objective.wrap_model(model), 0, std=0.3).eval()
        whole = objective.loss(model, batch, step_generator(3, 1))
        shares = [objective.loss(model, _rows(batch, rank, 2), _generator(rank, 2, 6)) for rank in (0, 1)]
        assert torch.allclose((shares[0] + shares[1]) / 2, whole, rtol=1e-5), objective.kind
        # Each process's rows got their own noise and masks, not the other process's.
        assert not torch.allclose(shares[0], shares[1])
    # The model's own label drop is off: the objective drops from the per-example draws instead.
    assert dit.conditioning.label_dropout == 0.0 and cases[1][0].label_dropout == 0.5


def test_mdlm_times_and_masks_of_two_processes_are_the_single_process_ones():
    from formerkit.data.base import DataBundle
    from formerkit.train.config import ObjectiveConfig
    from formerkit.train.masked_generation import MaskedDiffusionLM

    objective = MaskedDiffusionLM(ObjectiveConfig(kind="masked_diffusion_lm"),
                                  DataBundle(train=None, valid=None, test=None, model_fields={"vocab_size": 256}))
    tokens = torch.randint(256, (6, 40), generator=torch.Generator().manual_seed(1))
    inputs, masked, t = objective.corrupt(tokens, step_generator(3, 1))
    for rank in (0, 1):
        mine = objective.corrupt(tokens[rank::2], _generator(rank, 2, 6))
        for value, expected in zip(mine, (inputs, masked, t)):
            assert torch.equal(value, expected[rank::2])
