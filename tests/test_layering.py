"""House rules of the package layout, checked on the source: the library core never imports the
tiny-model harness (vidsparse.tiny), and the trainer and harness import no private names."""

import ast
from pathlib import Path

import vidsparse

PKG = Path(vidsparse.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(absolute module, imported names, line) of every import statement in ``path``, at any depth."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            yield target, names, node.lineno
            for name in names:  # `from . import tiny`
                yield f"{target}.{name}", [], node.lineno


def _core_files():
    return [p for p in PKG.rglob("*.py") if "tiny" not in p.relative_to(PKG).parts]


def test_core_never_imports_the_tiny_harness():
    offenders = [
        f"{p.relative_to(PKG.parent)}:{line} imports {target}"
        for p in _core_files()
        for target, _, line in _imports(p)
        if target == "vidsparse.tiny" or target.startswith("vidsparse.tiny.")
    ]
    assert not offenders, "the core must not import vidsparse.tiny:\n" + "\n".join(offenders)


def test_the_scan_sees_relative_and_absolute_imports(tmp_path):
    # the checker itself: a core file with each kind of import is caught
    fake = PKG / "training" / "flow.py"
    found = {t for t, _, _ in _imports(fake)}
    assert "torch" in found and "torch.nn.functional" in found
    tiny_files = list((PKG / "tiny").glob("*.py"))
    assert any(t.startswith("vidsparse.training") for p in tiny_files for t, _, _ in _imports(p))


def test_no_private_names_imported_across_modules():
    mine = [p for p in PKG.rglob("*.py")
            if p.relative_to(PKG).parts[0] in ("tiny", "training", "utils.py", "cli.py", "metrics.py")]
    offenders = [
        f"{p.relative_to(PKG.parent)}:{line} imports {name} from {target}"
        for p in mine
        for target, names, line in _imports(p)
        for name in names
        if name.startswith("_") and not name.startswith("__") and target.startswith("vidsparse")
    ]
    assert not offenders, "\n".join(offenders)
