"""The `tkernels` console script."""

import subprocess
import sys


def test_info_prints_versions_device_and_config():
    out = subprocess.run([sys.executable, "-m", "tkernels.cli", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for expected in ("tkernels", "torch", "triton", "vllm", "sglang", "device:", "config:", "why:"):
        assert expected in out.stdout
