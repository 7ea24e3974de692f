"""The SIMT emulator itself, through the emulated build's Python module: its schedule
argument, its launch counter, and the refusal of a build older than its sources.

The CUDA path of every op runs on the emulator in the op's own test file: on the
`cuda_emu` device (every test of the suite, under three thread schedules), and in
its emulated-vs-CPU tests (op_testing.OpContract.test_emulated_matches_cpu and the
op's property tests at the sizes where the launch geometry changes).
"""
import pytest
import torch

from op_testing import emu_dispatch, requires_emu

pytestmark = [requires_emu, pytest.mark.emulated]

EMU = torch.ops.tbd_ops_emu


def test_schedule_argument_and_launch_count():
    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"schedule must be 0 \(forward\), 1 \(reverse\) or 2"):
        emu_dispatch.emu.set_schedule(7, 0)
    # The emulator is exercised: the launch counter moves.
    before = emu_dispatch.emu.launch_count()
    EMU.channel_max_spatial_softmax(x, 1.0, False)
    assert emu_dispatch.emu.launch_count() == before + 2


def test_stale_build_is_refused_with_make_build_emu(monkeypatch):
    """A module built from other sources than those in the tree is refused, naming `make build-emu`."""
    import emu_sources
    assert emu_dispatch._load()[0] is not None  # built from the sources in the tree: accepted
    monkeypatch.setattr(emu_sources, "digest", lambda root=None: "0" * 64)  # the sources changed since
    module, why, stale = emu_dispatch._load()
    assert module is None and stale and "make build-emu" in why
