"""Training with several processes (torchrun, gloo on the CPU): DDP reproduces the single-process run, a SIGTERM
checkpoints on every rank at the same step and the resumed run equals an uninterrupted one, FSDP trains, saves a
loadable model and resumes. Every launch is 2 processes of ``formerkit.cli train cct-digits`` on a tiny model."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed
from safetensors.torch import load_file

import formerkit
from formerkit.train import train

from ..conftest import tiny_overrides
from .conftest import gated_train, wait_until_held

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this PyTorch build")

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 180

# conftest's tiny cct-digits, deterministic (no dropout) so that how the batch is split between processes changes
# nothing but float rounding.
TINY = tiny_overrides("cct-digits", **{"model.dropout": 0.0, "model.drop_path": 0.0, "model.attention.dropout": 0.0})
DDP = {**TINY, "schedule.steps": 100, "eval.every": 50, "run.checkpoint_every": 50}
FSDP = {**TINY, "schedule.steps": 10, "eval.every": 5, "run.checkpoint_every": 5, "schedule.grad_accum": 2}
# The CCT's sequence-pooling score bias has a zero gradient in exact arithmetic (softmax ignores a shared shift):
# Adam turns rounding noise into arbitrary steps there, harmlessly. Weights are compared without it.
NOISY = "head.pooling.score.bias"


def _sets(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU, even on a machine with GPUs
    return env


def _torchrun(out: Path, overrides: dict, *extra: str, gate: list[str] | None = None,
              launch: tuple[str, ...] = ("--standalone", "--nproc_per_node", "2")) -> list[str]:
    """torchrun (by default 2 processes on this machine, else as ``launch`` says) of ``formerkit.cli train
    cct-digits``, or of conftest's ``gated_train`` script ``gate``."""
    program = gate if gate is not None else ["-m", "formerkit.cli"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, *program,
            "train", "cct-digits", "--out", str(out), *_sets(overrides), *extra]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def _records(run: Path, kind: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip() and json.loads(line)["kind"] == kind]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return formerkit.load(directory).state_dict()


def _same_model(a: Path | torch.nn.Module, b: Path | torch.nn.Module, atol: float) -> None:
    first = a if isinstance(a, torch.nn.Module) else formerkit.load(a)
    second = b if isinstance(b, torch.nn.Module) else formerkit.load(b)
    images = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(first.eval()(images), second.eval()(images), atol=atol)
    for (name, x), (_, y) in zip(first.state_dict().items(), second.state_dict().items()):
        if name != NOISY:
            assert torch.allclose(x, y, atol=atol), name


def _truncate_to(run: Path, copy: Path, step: int) -> None:
    """``copy`` = ``run`` as if it had been interrupted right after its checkpoint at ``step``."""
    shutil.copytree(run, copy)
    for checkpoint in (copy / "checkpoints").glob("step-*"):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    shutil.rmtree(copy / "model")
    (copy / "summary.json").write_text(json.dumps({**_summary(run), "status": "interrupted", "steps": step}))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """One DDP run launched the way users do: ``formerkit train ... --nproc 2`` (which starts torchrun)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    _run([sys.executable, "-m", "formerkit.cli", "train", "cct-digits", "--nproc", "2", "--out", str(out),
          *_sets(DDP)])
    return out


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The DDP runs' recipe trained by one process on the whole batch."""
    return train("cct-digits", tmp_path_factory.mktemp("single") / "run", overrides=DDP)


@pytest.mark.slow
def test_nproc_launches_torchrun_and_rank_0_alone_writes_the_run_directory(ddp_run):
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json", "model/config.json", "model/model.safetensors"):
        assert (ddp_run / name).is_file(), name
    summary = _summary(ddp_run)
    assert summary["status"] == "completed" and summary["steps"] == DDP["schedule.steps"]
    # One record per step (a second writer would duplicate them), and the checkpoints of every 50 steps.
    assert [r["step"] for r in _records(ddp_run)] == list(range(1, DDP["schedule.steps"] + 1))
    assert [r["step"] for r in _records(ddp_run, "eval")] == [50, 100]
    assert sorted(p.name for p in (ddp_run / "checkpoints").glob("step-*")) == ["step-00000050", "step-00000100"]
    assert not list((ddp_run / "checkpoints").glob(".tmp-*"))
    # Each rank draws its own dropout stream, and the checkpoint keeps every rank's RNG state for an exact resume.
    rng = load_file(str(ddp_run / "checkpoints" / "step-00000100" / "rng.safetensors"))
    assert not torch.equal(rng["torch_cpu"], rng["rank1.torch_cpu"])


@pytest.mark.slow
def test_ddp_on_two_processes_follows_the_single_process_loss_curve(ddp_run, single_run):
    _same_run(ddp_run, single_run)


def _same_run(run: Path, single) -> None:
    """``run`` has ``single``'s losses, step by step, and its weights (``single``: train()'s result)."""
    expected = [r["loss"] for r in _records(single.run_dir)]
    losses = [r["loss"] for r in _records(run)]
    assert len(losses) == len(expected) == DDP["schedule.steps"]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(losses, expected)), (losses, expected)
    _same_model(run / "model", single.model, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_two_machines_rendezvous_and_follow_the_single_process_loss_curve(rendezvous, single_run, tmp_path):
    # The README's multi-machine launches on loopback: two torchrun launchers of one process each (the "machines"),
    # meeting at one endpoint; each has its own --out directory, as on machines without a shared disk.
    port = _free_port()

    def launch(node: int) -> tuple[str, ...]:
        if rendezvous == "c10d":
            meet = ("--rdzv-backend", "c10d", "--rdzv-id", "formerkit-test", "--rdzv-endpoint", f"127.0.0.1:{port}")
        else:
            meet = ("--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port))
        return ("--nnodes", "2", "--nproc-per-node", "1", *meet)

    outs = [tmp_path / f"machine{node}" / "run" for node in (0, 1)]
    nodes = [subprocess.Popen(_torchrun(out, DDP, launch=launch(node)), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for node, out in enumerate(outs)]
    try:
        outputs = [node.communicate(timeout=LAUNCH_TIMEOUT)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    # The machine of rank 0 alone holds the run directory: c10d's rendezvous picks it, the static one takes
    # --node-rank 0's.
    written = [out for out in outs if out.exists()]
    assert len(written) == 1, [sorted(p.name for p in out.parent.rglob("*")) for out in outs]
    if rendezvous == "static":
        assert written == outs[:1]
    assert _summary(written[0])["status"] == "completed"
    _same_run(written[0], single_run)


@pytest.mark.slow
def test_sigterm_under_torchrun_checkpoints_every_rank_at_one_step_and_the_resumed_run_is_uninterrupted(
        ddp_run, tmp_path):
    out = tmp_path / "run"
    # Both workers wait after their third optimizer step for the SIGTERM, then finish that step.
    gate = gated_train(3, tmp_path / "gate", "sigterm")
    process = subprocess.Popen(_torchrun(out, DDP, gate=gate), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until_held(tmp_path / "gate", process, ranks=2, timeout=LAUNCH_TIMEOUT,
                        stop=lambda: os.killpg(process.pid, signal.SIGKILL))
        process.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both workers
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    summary = _summary(out)
    stopped = summary["steps"]
    assert summary["status"] == "interrupted", output[-4000:]
    assert 3 <= stopped < DDP["schedule.steps"]
    assert stopped == 3  # the step the signal came in
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output, output[-4000:]
    # Both ranks stopped after the same step (a rank still training would hang the other in a collective), and
    # that step was checkpointed.
    assert _records(out)[-1]["step"] == stopped
    assert (out / "checkpoints" / f"step-{stopped:08d}" / "state.json").is_file()

    _run(_torchrun(out, DDP, "--resume"))
    assert _summary(out)["status"] == "completed"
    resumed, uninterrupted = _records(out), _records(ddp_run)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in uninterrupted], rel=1e-6, abs=0)
    for name, tensor in _weights(ddp_run / "model").items():
        assert torch.allclose(_weights(out / "model")[name], tensor, rtol=1e-6, atol=1e-7), name


@pytest.mark.slow
def test_fsdp_trains_saves_a_loadable_model_and_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "fsdp"
    _run(_torchrun(out, FSDP, "--strategy", "fsdp"))
    summary = _summary(out)
    assert summary["status"] == "completed" and summary["steps"] == FSDP["schedule.steps"]
    assert all(math.isfinite(r["loss"]) for r in _records(out))
    model = formerkit.load(out / "model")
    assert formerkit.load_extra(out / "model")["recipe"]["run"]["strategy"] == "fsdp"
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(4, 1, 8, 8))).all()
    # The gathered weights are the ones a single process trains (with gradient accumulation across 2 micro-batches).
    single = train("cct-digits", tmp_path / "single", overrides=FSDP)
    expected = [r["loss"] for r in _records(tmp_path / "single")]
    assert [r["loss"] for r in _records(out)] == pytest.approx(expected, rel=1e-5)
    _same_model(model, single.model, atol=1e-5)

    # The checkpoint holds whole tensors; resuming splits them between the processes again.
    assert (out / "checkpoints" / "step-00000005" / "model.safetensors").is_file()
    resumed = tmp_path / "resumed"
    _truncate_to(out, resumed, 5)
    _run(_torchrun(resumed, FSDP, "--strategy", "fsdp", "--resume"))
    assert _summary(resumed)["status"] == "completed"
    assert [r["loss"] for r in _records(resumed)] == pytest.approx([r["loss"] for r in _records(out)], rel=1e-6)
    _same_model(resumed / "model", out / "model", atol=1e-6)


def test_ema_with_fsdp_is_refused_before_training(tmp_path, monkeypatch):
    from formerkit.train import RunError, distributed, trainer

    # A stand-in for two FSDP processes: the check comes before any collective call.
    monkeypatch.setattr(trainer.distributed, "setup",
                        lambda strategy: distributed.Distributed(world_size=2, strategy=strategy))
    with pytest.raises(RunError, match="optim.ema_decay is not supported with run.strategy fsdp"):
        train("cct-digits", tmp_path / "run", overrides={**FSDP, "run.strategy": "fsdp", "optim.ema_decay": 0.9})
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ddp_logs_the_expert_load_of_every_process_passes(tmp_path):
    # Mixture of experts: each process routes its share of the batch; the logged load adds up their assignments, so
    # it is the single-process run's.
    overrides = {**TINY, "schedule.steps": 4, "run.log_every": 2, "eval.every": 4, "model.num_experts": 4,
                 "optim.lr": 1e-12}  # the weights stay as initialized: no rounding difference can flip a routing
    _run(_torchrun(tmp_path / "two", overrides))
    train("cct-digits", tmp_path / "one", overrides=overrides)
    two, one = _records(tmp_path / "two"), _records(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [2, 4]
    for a, b in zip(two, one):
        assert a["moe_load_max"] == pytest.approx(b["moe_load_max"], rel=1e-6)
        assert a["moe_load_entropy"] == pytest.approx(b["moe_load_entropy"], rel=1e-6)
        # Each process's balancing loss sees half the tokens: close to, not equal to, the whole batch's.
        assert a["moe_aux_loss"] == pytest.approx(b["moe_aux_loss"], rel=0.05)
