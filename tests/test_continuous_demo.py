"""The digits demo end to end in --quick mode (barely trained models), and the weight cache."""

import pytest

from tkernels.continuous import demo
from tkernels.continuous.mar import load_or_train_pair


@pytest.mark.slow
def test_quick_demo_writes_png_and_caches_weights(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert demo.main(["--quick", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--per-class", "1"]) == 0
    printed = capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "acceptance" in printed and "target only" in printed and "relaxed" in printed and "trained" in printed
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".pt", ".pt"]  # no temp files left
    logs = []
    load_or_train_pair(tmp_path / "cache", quick=True, log=logs.append)
    assert logs == []  # second load comes from the cache
