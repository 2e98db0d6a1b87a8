"""The documentation cannot rot: the API reference builds from the docstrings without a warning and covers every
public name, and the README's Python quickstart runs as pasted."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import lorakit

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = re.compile(r"<!-- quickstart -->\n```python\n(.*?)```", re.S)
PRINTED = re.compile(r"^print\(.*\)\s+# (.+)$")  # a print line whose comment says what it prints
DOCS = ["README.md", "ARCHITECTURE.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))]
AFTER_MERGE = "<!-- after-merge -->"  # a row describing work being merged: checked once the marker is gone


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[warnings.WarningMessage]]:
    """The HTML reference as `python -m pdoc lorakit -o DIR` builds it, and every warning pdoc gave."""
    pdoc = pytest.importorskip("pdoc")
    out = tmp_path_factory.mktemp("api")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc("lorakit", output_directory=out)
    # Third-party deprecations at import are not the reference's business (the suite ignores them as well).
    kept = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning,
                                                             FutureWarning))]
    return out, kept


def test_api_reference_builds_without_warnings(reference):
    out, caught = reference
    assert not caught, "\n".join(f"{w.category.__name__}: {w.message}" for w in caught)
    assert (out / "lorakit.html").is_file() and (out / "index.html").is_file()


@pytest.mark.parametrize("name", lorakit.__all__)
def test_every_public_name_has_a_docstring_and_a_reference_entry(reference, name):
    obj = getattr(lorakit, name)
    doc = inspect.getdoc(obj) if not inspect.isclass(obj) else obj.__dict__.get("__doc__")
    assert doc and doc.strip(), f"lorakit.{name} has no docstring"
    assert not doc.startswith(f"{name}("), f"lorakit.{name} has only the docstring dataclasses make up"
    page = (reference[0] / "lorakit.html").read_text(encoding="utf-8")
    assert f'id="{name}"' in page, f"lorakit.{name} is missing from the reference"


def quickstart_blocks(readme: str) -> list[str]:
    """The Python code blocks marked `<!-- quickstart -->` in the README, in order."""
    return QUICKSTART.findall(readme)


def test_readme_quickstart_runs_as_pasted(tmp_path):
    blocks = quickstart_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert blocks, "README.md has no <!-- quickstart --> python block"
    script = tmp_path / "quickstart.py"
    script.write_text("\n".join(blocks), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # What the README says a print shows is what it shows.
    promised = [m.group(1).strip() for block in blocks for line in block.splitlines()
                if (m := PRINTED.match(line.strip()))]
    printed = done.stdout.splitlines()
    assert promised and len(printed) == len(promised), done.stdout
    assert [line.strip() for line in printed] == promised


def documented_code(text: str) -> list[str]:
    """Inline code spans and ```python blocks of a Markdown text, leaving out lines marked after-merge."""
    kept = "\n".join(line for line in text.splitlines() if AFTER_MERGE not in line)
    blocks = re.findall(r"```python\n(.*?)```", kept, re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", kept, flags=re.S))
    return blocks + spans


def lorakit_calls(code: str) -> list[ast.Call]:
    """The calls `lorakit.name(...)` in a piece of code (none when it is not Python)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "lorakit"]


@pytest.mark.parametrize("doc", DOCS)
def test_documented_lorakit_names_and_calls_exist(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    kept = "\n".join(line for line in text.splitlines() if AFTER_MERGE not in line)
    for name in set(re.findall(r"\blorakit\.([A-Za-z_]\w*)", kept)):
        assert hasattr(lorakit, name) or importlib.util.find_spec(f"lorakit.{name}"), f"{doc}: lorakit.{name}"
    calls = [call for code in documented_code(text) for call in lorakit_calls(code)]
    for call in calls:
        shown = ast.unparse(call)
        assert hasattr(lorakit, call.func.attr), f"{doc}: {shown}"
        if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
            continue  # *args / **kwargs: nothing to bind
        signature = inspect.signature(getattr(lorakit, call.func.attr))
        try:
            signature.bind(*call.args, **{k.arg: k.value for k in call.keywords})
        except TypeError as e:
            pytest.fail(f"{doc}: {shown} does not fit lorakit.{call.func.attr}{signature}: {e}")


def test_architecture_tree_names_every_source_file():
    """ARCHITECTURE.md's tree and the package agree: every module (and C source) under src/lorakit is named in
    its folder's part of the tree, and every folder of the tree exists."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    tree = text.split("```", 2)[1]  # the first code block: the tree
    package = ROOT / "src" / "lorakit"
    parts = re.split(r"^  (\w+)/", tree, flags=re.M)  # [top, folder, its text, folder, its text, ...]
    named = {"": parts[0], **dict(zip(parts[1::2], parts[2::2]))}
    missing = []
    for path in sorted(package.rglob("*")):
        if path.suffix not in (".py", ".c") or path.name == "__init__.py" or "__pycache__" in path.parts:
            continue
        folder = path.relative_to(package).parts[0] if len(path.relative_to(package).parts) > 1 else ""
        if not re.search(rf"(?<![\w.]){re.escape(path.name)}\b", named.get(folder, "")):
            missing.append(str(path.relative_to(package)))
    assert not missing, f"ARCHITECTURE.md's tree does not name: {missing}"
    assert all((package / folder).is_dir() for folder in named if folder), sorted(named)
