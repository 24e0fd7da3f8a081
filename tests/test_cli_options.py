"""The shared mask flags (vidsparse.cli_options): one SparseConfig from --method, --topk, ...,
--option KEY=VALUE, and argparse errors (exit 2) that name the flag."""

import argparse

import pytest

from vidsparse import SparseConfig
from vidsparse.cli_options import UNSET, add_mask_arguments, parse_option, parse_option_value, sparse_config_from_args

DEMO = SparseConfig(topk=0.03, topp=0.1)


def _parse(argv, defaults=DEMO):
    p = argparse.ArgumentParser(prog="cmd")
    add_mask_arguments(p, defaults)
    return sparse_config_from_args(p.parse_args(argv), p)


def _error(argv, capsys, defaults=DEMO) -> str:
    with pytest.raises(SystemExit) as exc:
        _parse(argv, defaults)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_no_flags_give_the_defaults():
    assert _parse([]) == DEMO
    assert _parse([], SparseConfig(method="svg", block_q=64)) == SparseConfig(method="svg", block_q=64)
    p = argparse.ArgumentParser()
    add_mask_arguments(p)
    args = p.parse_args([])
    assert args.topk is UNSET and args.option == [] and sparse_config_from_args(args, p) == SparseConfig()


def test_named_flags():
    cfg = _parse(["--topk", "0.25", "--topp", "none", "--block-q", "16", "--block-k", "32", "--token-order", "tiled",
                  "--keep-diagonal", "--keep-sink", "--backend", "reference"])
    assert cfg == SparseConfig(topk=0.25, topp=None, block_q=16, block_k=32, token_order="tiled", keep_diagonal=True,
                               keep_sink=True, backend="reference")
    # --no-keep-diagonal switches off a default that is on
    on = SparseConfig(topk=0.03, keep_diagonal=True)
    assert _parse(["--no-keep-diagonal"], on).resolved_options()["keep_diagonal"] is False


def test_method_drops_the_defaults_method_options_and_option_sets_any():
    cfg = _parse(["--method", "svg", "--token-order", "tiled", "--option", "budget=0.1", "--option", "samples=32"])
    assert cfg.method == "svg" and dict(cfg.options) == {"token_order": "tiled", "budget": 0.1, "samples": 32}
    # --option is applied after the named flags: it wins
    assert _parse(["--topk", "0.2", "--option", "topk=0.5"]).options["topk"] == 0.5
    tiled = _parse(["--option", "token_order=tiled", "--option", "tile=1,4,4", "--option", "window=none"])
    assert tiled.options["tile"] == (1, 4, 4) and tiled.options["token_order"] == "tiled"


@pytest.mark.parametrize("text, value", [
    ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3), ("none", None), ("None", None), ("true", True),
    ("False", False), ("4,4,4", (4, 4, 4)), ("1,2", (1, 2)), ("tiled", "tiled"),
])
def test_option_values(text, value):
    got = parse_option_value(text)
    assert got == value and type(got) is type(value)
    assert parse_option(f"key={text}") == ("key", value)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1,x", ""])
def test_bad_option_values(text):
    with pytest.raises(ValueError):
        parse_option_value(text)


@pytest.mark.parametrize("argv, names", [
    (["--topk", "2"], "--topk"),
    (["--topk", "nan"], "--topk"),
    (["--topp", "abc"], "--topp"),
    (["--block-q", "48"], "--block-q"),
    (["--block-k", "0"], "--block-k"),
    (["--block-q", "x"], "--block-q"),
    (["--method", "nope"], "--method"),
    (["--token-order", "spiral"], "--token-order"),
    (["--backend", "cuda"], "--backend"),
    (["--option", "foo=1"], "--option foo"),
    (["--option", "topk"], "--option"),
    (["--option", "topk=inf"], "--option"),
    (["--option", "block_q=16"], "--option block_q"),
    (["--method", "svg", "--topk", "0.1"], "--topk"),
    (["--token-order", "raster", "--option", "tile=4,4,4"], "--option tile"),  # tile needs tiles
])
def test_errors_name_the_flag(argv, names, capsys):
    err = _error(argv, capsys)
    assert f"error: argument {names}" in err or f"error: {names}" in err, err


def test_helper_needs_add_mask_arguments_first():
    p = argparse.ArgumentParser()
    with pytest.raises(ValueError, match="add_mask_arguments"):
        sparse_config_from_args(argparse.Namespace(), p)
    with pytest.raises(TypeError, match="SparseConfig"):
        add_mask_arguments(p, {"topk": 0.1})


def test_help_shows_the_commands_defaults(capsys):
    p = argparse.ArgumentParser(prog="cmd")
    add_mask_arguments(p, DEMO)
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "hybrid(topk=0.03, topp=0.1) 128x64" in out and "--option KEY=VALUE" in out


def test_number_types():
    from vidsparse.cli_options import float_in, int_at_least

    p = argparse.ArgumentParser(prog="cmd")
    p.add_argument("--n", type=int_at_least(0))
    p.add_argument("--lr", type=float_in(0, low_open=True))
    p.add_argument("--ratio", type=float_in(0, 1, none=True))
    args = p.parse_args(["--n", "0", "--lr", "1e-4", "--ratio", "none"])
    assert (args.n, args.lr, args.ratio) == (0, 1e-4, None)
    for argv in (["--n", "-1"], ["--n", "1.5"], ["--lr", "0"], ["--lr", "nan"], ["--lr", "inf"], ["--ratio", "1.5"]):
        with pytest.raises(SystemExit) as exc:
            p.parse_args(argv)
        assert exc.value.code == 2
