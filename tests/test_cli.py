"""The command line: `vidsparse info` and the synthetic demo run and report real numbers."""

import json

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


def test_demo_writes_mask_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--frames", "2", "--height", "8", "--width", "16", "--heads", "2", "--head-dim", "32",
                 "--block-q", "32", "--block-k", "16", "--topk", "0.1", "--topp", "0.3", "--out", str(out)]) == 0
    summary = json.loads((out / "demo.json").read_text())
    dense, hybrid, rand = summary["rows"]
    assert dense["rel_err"] == 0.0 and 0.0 < hybrid["sparsity"] < 1.0
    # on this local structure the predicted mask must beat a random mask of the same density
    assert hybrid["rel_err"] < rand["rel_err"]
    assert (out / "mask_head0.png").stat().st_size > 1000
    assert "vidsparse hybrid mask" in capsys.readouterr().out


def test_demo_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        main(["demo", "--frames", "0"])
