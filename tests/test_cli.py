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
