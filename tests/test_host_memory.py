"""Host memory for timing: cached_host_memory keeps freed blocks for reuse (no page faults), then gives
everything back; the timing code and the CLI report the faults and the mode."""

from __future__ import annotations

import json

import pytest
import torch

from mtprune.cli import main
from mtprune.cost import interleaved_latency
from mtprune.cost.host_memory import (
    CACHED,
    SYSTEM,
    cached_host_memory,
    can_cache,
    host_memory,
    host_memory_context,
    minor_faults,
)
from mtprune.errors import UsageError

glibc = pytest.mark.skipif(not can_cache(), reason="cached host memory needs glibc")
MIB = 64  # above glibc's largest mmap threshold (32 MiB): always a fresh mmap when not cached


def _faults_of_a_fresh_tensor(mib: int = MIB) -> int:
    """Minor faults of allocating, writing and freeing a 64 MiB tensor (16384 pages of 4 KiB)."""
    f0 = minor_faults()
    t = torch.empty(mib * 2**18)
    t.fill_(1.0)
    del t
    return minor_faults() - f0


@glibc
def test_cached_host_memory_reuses_freed_blocks_and_gives_them_back():
    assert host_memory() == SYSTEM
    before = _faults_of_a_fresh_tensor()
    with cached_host_memory():
        assert host_memory() == CACHED
        for _ in range(4):  # the heap grows (several times: an object allocated meanwhile may split the freed block)
            _faults_of_a_fresh_tensor()
        with cached_host_memory():  # nests
            inside = [_faults_of_a_fresh_tensor() for _ in range(3)]
        assert host_memory() == CACHED
    after = _faults_of_a_fresh_tensor()
    assert host_memory() == SYSTEM
    # 16384 faults with 4 KiB pages, 32 where transparent huge pages are always on
    assert before >= 16 and after >= 16
    assert max(inside) * 8 < min(before, after)


@glibc
def test_leaving_cached_host_memory_keeps_serving_blocks_below_32_mib_from_the_heap():
    """glibc stops adjusting its thresholds after a mallopt call: leaving must not strand them at their
    start-up 128 KiB, which would mmap (and page-fault) every tensor above it from then on."""
    with cached_host_memory():
        pass
    faults = [_faults_of_a_fresh_tensor(8) for _ in range(4)]  # 2048 pages each when mmap'd
    assert faults[-1] < 2048 // 8


def test_host_memory_modes_are_checked():
    with pytest.raises(UsageError, match="unknown host memory 'huge'; choose from system, cached"):
        host_memory_context("huge")
    with host_memory_context(SYSTEM):
        assert host_memory() == SYSTEM


@glibc
def test_timings_report_page_faults_per_forward_and_the_host_memory():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())

    def time_it() -> dict:
        return interleaved_latency({"a": net}, (16, 16), runs=20, warmup=2)["a"]

    plain = time_it()
    assert plain["host_memory"] == SYSTEM and plain["page_faults"] >= 0
    with cached_host_memory():
        cached = time_it()
    assert cached["host_memory"] == CACHED and cached["page_faults"] == 0


@glibc
def test_cost_best_times_with_cached_host_memory_unless_told_otherwise(tmp_path, capsys):
    from tests.test_cli_models import dense_and_pruned

    args = [*dense_and_pruned(tmp_path, capsys), "--latency"]
    assert main([*args, "--runtime", "best", "--timing", "threads=1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["host_memory"] == CACHED and out["page_faults"] == out["against_page_faults"] == 0
    assert all(c["page_faults"] == 0 for c in out["configs"])
    assert host_memory() == SYSTEM  # given back when the command ends
    assert main([*args, "--timing", "host_memory=system", "threads=1"]) == 0
    text = capsys.readouterr().out
    assert "memory  system; page faults per forward: this " in text
    assert main([*args[:-1], "--timing", "host_memory=cached"]) == 2
    assert "--runtime / --timing: only when nets are timed" in capsys.readouterr().err


@glibc
def test_prune_times_round_to_auto_in_the_host_memory_asked_for_and_records_it(tmp_path, capsys, monkeypatch):
    from tests.test_fit import fake_ms, fake_ratio

    import mtprune.cost.tables as fit_mod

    seen = set()

    def timed(s, *_, **__):
        seen.add(host_memory())
        return fake_ms(s)

    monkeypatch.setattr(fit_mod, "time_conv", timed)
    monkeypatch.setattr(fit_mod, "time_pair", lambda a, b, *_, **__: fake_ratio(a, b))
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    d = str(tmp_path / "d")
    main(["init", "--model", "deeplabv3_resnet18", "--num-classes", "3", "--width", "0.25", "--out", d])
    base = ["prune", "--checkpoint", d, "--method", "uniform", "--ratio", "0.4", "--size", "32", "32"]
    assert main([*base, "--round-to", "auto", "--timing", "host_memory=cached", "--out", str(tmp_path / "p")]) == 0
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["cost"]["host_memory"] == CACHED and seen == {CACHED} and host_memory() == SYSTEM
    capsys.readouterr()
    assert main([*base, "--timing", "host_memory=cached", "--out", str(tmp_path / "q")]) == 2
    assert (
        "--runtime / --timing: only with --target latency=X or --round-to auto" in capsys.readouterr().err
        and not (tmp_path / "q").exists()
    )


def test_host_memory_names_a_preloaded_allocator_and_the_environment(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert host_memory() == "preloaded (libjemalloc.so.2)"
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    assert host_memory() == CACHED
