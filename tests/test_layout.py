"""The repository's layout: the lesson at the top, the machinery and the tools beside it, and every
import pointing down (tools -> train.py -> training/ -> data.py, tidpo.py), so that no circle exists."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_imports(path):
    """The project's modules that a file imports anywhere in it (function bodies included), as
    dotted names: "tidpo", "data", "train", "training.memory", "tools.experiments"."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if node.module in ("training", "tools") else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in ("tidpo", "data", "train", "training", "tools"))
    return found


def training_order():
    # the order training/__init__.py lists its modules in: each may import only those above it
    doc = ast.get_docstring(ast.parse((ROOT / "training" / "__init__.py").read_text()))
    return [f"training.{name}" for name in re.findall(r"^\s+(\w+)\.py\s", doc, flags=re.M)]


def test_the_top_level_holds_only_the_lesson():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    top = sorted(name for name in tracked if "/" not in name) if tracked else \
        sorted(p.name for p in ROOT.glob("*.py"))
    assert top == ["data.py", "tidpo.py", "train.py"]


def test_training_lists_every_module_once():
    order = training_order()
    modules = sorted(f"training.{p.stem}" for p in (ROOT / "training").glob("*.py") if p.stem != "__init__")
    assert sorted(order) == modules and len(set(order)) == len(order)


def test_every_import_points_down():
    order = training_order()
    below = {"tidpo": set(), "data": {"tidpo"}}  # what each module may import
    for index, name in enumerate(order):
        below[name] = {"tidpo", "data", *order[:index]}
    below["train"] = {"tidpo", "data", *order}
    for path in sorted((ROOT / "tools").glob("*.py")):
        below[f"tools.{path.stem}"] = {"tidpo", "data", "train", *order}
        if path.stem != "experiments":  # the methods' flags and hooks, which import no other tool: no circle
            below[f"tools.{path.stem}"].add("tools.experiments")
    for name, allowed in below.items():
        path = ROOT / (name.replace(".", "/") + ".py")
        wrong = project_imports(path) - allowed - {name}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}, which sit above it (or beside it)"


def test_tidpo_imports_nothing_of_the_project():
    assert project_imports(ROOT / "tidpo.py") == set()


def test_the_import_checker_sees_imports_inside_functions(tmp_path):
    # the check above would be empty if it missed lazy imports: a hand case with one of each kind
    path = tmp_path / "module.py"
    path.write_text("import torch\nimport data\nfrom training import memory, setup as s\n"
                    "def f():\n    from tools import bench\n    import train\n")
    assert project_imports(path) == {"data", "training.memory", "training.setup", "tools.bench", "train"}


def test_every_module_says_what_it_is_for():
    for path in sorted([*ROOT.glob("*.py"), *(ROOT / "training").glob("*.py"), *(ROOT / "tools").glob("*.py")]):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, f"{path.relative_to(ROOT)} has no first docstring line"


def test_the_lesson_keeps_its_budgets():
    lines = {name: (ROOT / name).read_text().splitlines() for name in ("tidpo.py", "train.py", "data.py")}
    assert len(lines["tidpo.py"]) <= 400 and len(lines["train.py"]) <= 420 and len(lines["data.py"]) <= 350
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
    for name in ("tidpo.py", "train.py", "data.py"):
        assert all(len(line) <= 100 for line in lines[name]), name
    flags = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert flags.returncode == 0 and len(re.findall(r"^  --", flags.stdout, flags=re.M)) <= 34


def test_one_line_width_for_the_repository():
    # pyproject.toml states it once (ruff's line-length); the lesson keeps to 100 (above)
    width = int(re.search(r"^line-length = (\d+)", (ROOT / "pyproject.toml").read_text(), flags=re.M)[1])
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*/*.py")]:
        long = [n for n, line in enumerate(path.read_text().splitlines(), 1) if len(line) > width]
        assert not long, f"{path.relative_to(ROOT)}: lines {long} are longer than {width} characters"
