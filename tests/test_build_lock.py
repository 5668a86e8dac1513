"""Empty-weight builds are thread-local: a model built on the meta device in one thread (serving's
watcher loading a version) must not give meta parameters to modules built meanwhile in another
thread or in a child forked meanwhile (serving checks candidate versions in a forked child), and
overlapping builds must not leave anything patched."""

from __future__ import annotations

import multiprocessing
import threading

import torch

from model import checkpoint
from model.empty_init import empty_weights


def _child_builds(conn) -> None:
    with checkpoint._BUILD_LOCK:  # a fresh lock in the child: no deadlock on the parent's holder
        conn.send(torch.nn.Linear(2, 2).weight.is_meta)
    conn.close()


def test_empty_weights_act_in_their_own_thread_only():
    entered, leave = threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def build_in_progress() -> None:
        with checkpoint._BUILD_LOCK, empty_weights():  # what build_model holds for a meta LM
            seen["builder"] = torch.nn.Linear(2, 2).weight.is_meta
            entered.set()
            leave.wait(30)
            seen["builder_after_fork"] = torch.nn.Linear(2, 2).weight.is_meta

    builder = threading.Thread(target=build_in_progress)
    builder.start()
    try:
        assert entered.wait(30)
        assert not torch.nn.Linear(2, 2).weight.is_meta, "another thread's empty build leaked here"
        ctx = multiprocessing.get_context("fork")
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_child_builds, args=(sender,))
        child.start()
        sender.close()
        assert receiver.poll(60), "the child never answered (deadlocked on the build lock?)"
        child_built_meta = receiver.recv()
        child.join(30)
    finally:
        leave.set()
        builder.join(30)
    assert child_built_meta is False, "the child inherited the empty-weights state"
    assert seen == {"builder": True, "builder_after_fork": True}
    assert not torch.nn.Linear(2, 2).weight.is_meta


def test_overlapping_empty_builds_leave_nothing_behind():
    """Two threads entering and leaving in crossed order (accelerate's global patch could then
    restore the patched method and leave every later module on the meta device)."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with empty_weights():
            a_in.set()
            b_in.wait(30)
        a_out.set()

    def second() -> None:
        a_in.wait(30)
        with empty_weights():
            b_in.set()
            a_out.wait(30)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not torch.nn.Linear(2, 2).weight.is_meta
    assert not torch.nn.BatchNorm1d(3).weight.is_meta
