"""The command line: `vidsparse info`, and for every subcommand a bad path and a bad value, each
exit code 2 with one error line naming the flag, before any work (the model loader is patched to
fail the test if it is called). The demo and eval runs themselves: tests/test_demo.py,
tests/test_evaluate.py."""

import json
import shutil
import sys

import pytest

from vidsparse.cli import main
from vidsparse.tiny.model import default_weights_dir


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference  usable (forward + backward)" in out
    assert "triton" in out and "flex" in out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["nonsense"])


def test_every_subcommand_is_listed(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("info", "demo", "eval", "bench", "distill", "compare"):
        assert f"{name}:" in out


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

    env = dict(os.environ, VIDSPARSE_TMA="yes", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", "import vidsparse.kernels.triton_attention"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "VIDSPARSE_TMA must be one of" in proc.stderr


# ----------------------------------------------------------------------------------------------
# Bad paths and values: exit code 2, one line naming the flag, nothing loaded


@pytest.fixture
def no_work(monkeypatch):
    """Any model load fails the test: the errors must come before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("vidsparse.tiny.model.load_tiny_wan", refuse)
    monkeypatch.setattr("vidsparse.tiny.flow.sample", refuse)


@pytest.fixture
def paths(tmp_path):
    """A file, a model folder with a corrupt safetensors file, one with a bad config.json, and one
    whose safetensors file is truncated."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(default_weights_dir() / "config.json", corrupt)
    (corrupt / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage, not a safetensors file" * 4)
    bad_config = tmp_path / "bad_config"
    shutil.copytree(default_weights_dir(), bad_config)
    (bad_config / "config.json").write_text('{"_class_name": "WanTransformer3DModel", ')
    truncated = tmp_path / "truncated"
    shutil.copytree(default_weights_dir(), truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    return {"file": a_file, "corrupt": corrupt, "bad_config": bad_config, "truncated": truncated, "dir": tmp_path}


def _fails_cleanly(argv, flag, capsys, *, says=""):
    """``vidsparse ARGV`` exits with code 2 and one error line that names ``flag`` (and ``says``)."""
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)  # commands that return their exit code instead of raising
    assert exc.value.code == 2, exc.value.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert flag in lines[0] and says in lines[0], lines[0]
    return lines[0]


def test_info_bad_value(capsys):
    # info writes nothing and takes no flags: an unknown flag is the only bad input
    _fails_cleanly(["info", "--out", "x"], "--out", capsys, says="unrecognized arguments")


@pytest.mark.parametrize("case, flag, says", [
    ("out_file", "--out", "is a file, not a folder"),
    ("out_under_file", "--out", "is a file, not a folder"),
    ("out_unwritable", "--out", "cannot create the folder"),
    ("model_corrupt", "--model", "diffusion_pytorch_model.safetensors is not a valid safetensors file"),
    ("model_truncated", "--model", "truncated"),
    ("model_bad_config", "--model", "config.json is not valid JSON"),
    ("distilled_corrupt", "--distilled-path", "is not a valid safetensors file"),
    ("topk", "--topk", "must lie in (0, 1]"),
    ("steps", "--steps", "expected an integer"),
])
def test_demo_bad_paths_and_values(case, flag, says, paths, no_work, capsys):
    argv = {
        "out_file": ["--out", str(paths["file"])],
        "out_under_file": ["--out", str(paths["file"] / "sub")],
        "out_unwritable": ["--out", "/proc/vidsparse_no_such_folder"],
        "model_corrupt": ["--model", str(paths["corrupt"])],
        "model_truncated": ["--model", str(paths["truncated"])],
        "model_bad_config": ["--model", str(paths["bad_config"])],
        "distilled_corrupt": ["--distilled-path", str(paths["corrupt"])],
        "topk": ["--topk", "2"],
        "steps": ["--steps", "two"],
    }[case]
    out = paths["dir"] / "demo_out"
    _fails_cleanly(["demo", "--device", "cpu", *(["--out", str(out)] if "--out" not in argv else []), *argv],
                   flag, capsys, says=says)
    assert not (out / "results.json").exists()


def test_demo_without_the_video_extra_names_the_extra(monkeypatch, no_work, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # `import torchmetrics` now fails
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--device", "cpu", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "pip install 'vidsparse[video]'" in err and "torchmetrics" in err and "Traceback" not in err


def test_demo_unwritable_folder(monkeypatch, no_work, capsys, tmp_path):
    # root may write anywhere: simulate a folder this process cannot write
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path) else real(p, mode, **kw))
    _fails_cleanly(["demo", "--device", "cpu", "--out", str(tmp_path / "new")], "--out", capsys,
                   says="permission denied")


@pytest.mark.parametrize("case, flag, says", [
    ("json_dir", "--json", "is a folder"),
    ("json_under_file", "--json", "is a file, not a folder"),
    ("model_corrupt", "--model", "is not a valid safetensors file"),
    ("reference_bad_config", "--reference", "config.json is not valid JSON"),
    ("setting", "--setting", "unknown key(s) ['topq']"),
    ("clips", "--clips", "must be >= 1"),
])
def test_eval_bad_paths_and_values(case, flag, says, paths, no_work, capsys):
    argv = {
        "json_dir": ["--json", str(paths["dir"])],
        "json_under_file": ["--json", str(paths["file"] / "eval.json")],
        "model_corrupt": ["--model", str(paths["corrupt"])],
        "reference_bad_config": ["--reference", str(paths["bad_config"])],
        "setting": ["--setting", "x:topq=0.1"],
        "clips": ["--clips", "0"],
    }[case]
    json_out = [] if "--json" in argv else ["--json", str(paths["dir"] / "eval.json")]
    _fails_cleanly(["eval", "--device", "cpu", *json_out, *argv], flag, capsys, says=says)
    assert not (paths["dir"] / "eval.json").exists()


@pytest.mark.parametrize("argv, flag, says", [
    (["--out", "FILE"], "--out", "is a file, not a folder"),
    (["--sparsities", "abc"], "--sparsities", ""),
])
def test_compare_bad_paths_and_values(argv, flag, says, paths, no_work, capsys):
    argv = [str(paths["file"]) if a == "FILE" else a for a in argv]
    _fails_cleanly(["compare", "--device", "cpu", *argv], flag, capsys, says=says)


@pytest.mark.parametrize("argv, flag", [
    (["--out", "FILE"], "--out"),
    (["--out", "DIR/distill", "--steps", "0"], "--steps"),
])
def test_distill_bad_paths_and_values(argv, flag, paths, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("vidsparse.tiny.model.load_tiny_wan", refuse)
    argv = [str(paths["file"]) if a == "FILE" else a.replace("DIR", str(paths["dir"])) for a in argv]
    _fails_cleanly(["distill", "--device", "cpu", *argv], flag, capsys)


def test_bench_bad_value(capsys):
    _fails_cleanly(["bench", "attention", "--sparsities", "abc"], "--sparsities", capsys, says="expected")


def test_bench_bad_path(tmp_path, capsys):
    _fails_cleanly(["bench", "attention", "--out", str(tmp_path), "--sparsities", "0.5"], "--out", capsys)


def test_output_checks_write_nothing_but_the_folder(tmp_path):
    from vidsparse.utils import check_output_dir, check_output_file

    assert check_output_dir(tmp_path / "a" / "b", "--out").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the write probe is gone
    target = check_output_file(tmp_path / "c" / "eval.json", "--json")
    assert target.parent.is_dir() and not target.exists()
    with pytest.raises(ValueError, match="^--json .*: is a folder"):
        check_output_file(tmp_path, "--json")


def test_model_check_accepts_the_shipped_models():
    from vidsparse.tiny.demo import distilled_dir
    from vidsparse.utils import check_model_dir

    for folder in (default_weights_dir(), distilled_dir()):
        assert check_model_dir(folder, "--model") == folder
    assert json.loads((distilled_dir() / "sparse_config.json").read_text())["format"] == 1
