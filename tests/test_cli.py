"""The command line: `vidsparse info` and argument errors (the demo itself: tests/test_demo.py)."""

import pytest

from vidsparse.cli import main


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference  usable (forward + backward)" in out
    assert "triton" in out and "flex" in out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["nonsense"])


def test_demo_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        main(["demo", "--frames", "0"])


def test_info_names_the_kernel_choice(capsys, monkeypatch):
    monkeypatch.delenv("VIDSPARSE_TMA", raising=False)
    assert main(["info"]) == 0
    assert "VIDSPARSE_TMA=auto: TMA forward and dK/dV kernels for bf16/fp16 on sm_90+" in capsys.readouterr().out
    monkeypatch.setenv("VIDSPARSE_TMA", "0")
    assert main(["info"]) == 0
    assert "VIDSPARSE_TMA=0: pointer kernels only" in capsys.readouterr().out


def test_bad_kernel_variant_variable_is_a_clear_error():
    import os
    import subprocess
    import sys

    env = dict(os.environ, VIDSPARSE_TMA="yes", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", "import vidsparse.kernels.triton_attention"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "VIDSPARSE_TMA must be one of" in proc.stderr
