"""Distributed training on CPU: ``torchrun`` with 2 gloo processes (DDP, and FSDP2) follows the same
loss curve as one process with the same global batch (``scripts/ddp_check.py`` does the training)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
LOSS_TOLERANCE = 0.01  # per step, absolute: per-rank means vs one global mean differ slightly


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_check(out: Path, nproc: int, *extra: str) -> dict:
    cmd = [sys.executable, "scripts/ddp_check.py", "--out", str(out), *extra]
    if nproc > 1:
        port = str(free_port())
        cmd = [str(TORCHRUN), "--nproc_per_node", str(nproc), "--master_port", port, *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own session, killed as a group on timeout: a stuck rank must not outlive the test.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in 300 s:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return json.loads(out.read_text())


def losses(result: dict) -> list[float]:
    return [h["loss"] for h in result["history"]]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return run_check(tmp_path_factory.mktemp("ddp") / "one.json", 1)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_loss_curve(single: dict, mode: str, tmp_path: Path):
    two = run_check(tmp_path / f"{mode}.json", 2, *(["--fsdp"] if mode == "fsdp" else []))
    assert two["world_size"] == 2 and single["world_size"] == 1
    assert two["params_in_sync"], "ranks ended with different weights"
    one_curve, two_curve = losses(single), losses(two)
    diffs = [abs(a - b) for a, b in zip(one_curve, two_curve)]
    print(f"\n{mode}: 1 proc {' '.join(f'{x:.4f}' for x in one_curve)}")
    print(f"{mode}: 2 proc {' '.join(f'{x:.4f}' for x in two_curve)}")
    print(f"{mode}: max |diff| {max(diffs):.5f} (tolerance {LOSS_TOLERANCE})")
    assert len(one_curve) == len(two_curve)
    assert max(diffs) < LOSS_TOLERANCE
    assert two_curve[-1] < two_curve[0] - 0.5  # it really trained
    # The trained weights agree too (same fingerprint up to the loss-averaging difference).
    for name, (_, squares) in single["params"].items():
        assert two["params"][name][1] == pytest.approx(squares, rel=0.05, abs=1e-3), name


@pytest.mark.slow
def test_text_only_pretraining_syncs_gradients_under_ddp(tmp_path: Path):
    one = run_check(tmp_path / "one.json", 1, "--text-only")
    two = run_check(tmp_path / "two.json", 2, "--text-only")
    assert two["params_in_sync"]
    assert max(abs(a - b) for a, b in zip(losses(one), losses(two))) < LOSS_TOLERANCE
