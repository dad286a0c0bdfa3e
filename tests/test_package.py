"""The package as users install it: one top-level import name, imports that only run down the floors
of the house, and a wheel that holds every file the package needs."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import x2edit

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(x2edit.__file__).resolve().parent

# The floors, bottom up (README, "Layout"). A module's floor is that of its longest prefix here; the
# core is every module of x2edit that no other floor claims.
LAYERS = {"x2edit.kernels": 0, "x2edit": 1, "x2edit.data_pipeline": 2, "x2edit.training": 3,
          "x2edit.retrieval": 4, "x2edit.app": 5, "x2edit.cli": 6}


def floor(module: str) -> int:
    return LAYERS[max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)]


def modules(package_dir: Path) -> dict[str, Path]:
    """{dotted name: file} of every module of the package (a package by its __init__.py)."""
    found = {}
    for path in package_dir.rglob("*.py"):
        parts = ("x2edit", *path.relative_to(package_dir).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from every import statement, at the top or inside a
    function alike (a lazy import is still an arrow), and from strings that name a module (the lazy
    attribute tables and the CLI's command table hand such strings to importlib)."""
    mods = modules(package_dir)

    def resolve(name: str) -> str | None:  # the longest module prefix: an imported name is in its module
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == "x2edit"}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative import; write the absolute x2edit.* path"
                if node.module.split(".")[0] == "x2edit":
                    targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else resolve(node.module)
                                for a in node.names}
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
                targets.add(node.value if node.value in mods else None)  # "x2edit.pipeline", not "x2edit"
        graph[name] = targets - {name, None}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_run_only_down_the_floors():
    graph = import_graph(PACKAGE)
    assert {floor(m) for m in graph} == set(LAYERS.values())  # every floor has modules: the map is current
    upward = sorted(f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
                    for m, targets in graph.items() for t in targets if floor(t) > floor(m))
    assert not upward, "imports running up a floor:\n" + "\n".join(upward)


def test_the_import_graph_has_no_circle():
    assert circles(import_graph(PACKAGE)) == []


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """The walk itself: module-level, lazy, from-package and string imports all count."""
    pkg = tmp_path / "x2edit"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "__init__.py").write_text('_LAZY = {"X": "x2edit.pipeline"}\n')
    (pkg / "kernels" / "__init__.py").write_text("def f():\n    from x2edit import pipeline\n")
    (pkg / "pipeline.py").write_text("import x2edit.kernels.missing as m\nfrom x2edit.kernels import f\n")
    graph = import_graph(pkg)
    assert graph == {"x2edit": {"x2edit.pipeline"}, "x2edit.kernels": {"x2edit.pipeline"},
                     "x2edit.pipeline": {"x2edit.kernels"}}
    assert circles(graph) == [["x2edit.kernels", "x2edit.pipeline"]]


def test_readme_layout_lists_the_same_floors():
    """The README's layout section is the map a reader gets: it must be the one this test enforces."""
    layout = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+(\S+?)/?\s+floor (\d)\b", layout, re.M)}
    expected = {name.removeprefix("x2edit.") if name != "x2edit" else "(core)": f for name, f in LAYERS.items()}
    assert listed == expected


def test_import_of_the_kernels_loads_no_model_library():
    code = ("import sys; import x2edit.kernels\n"
            "heavy = sorted(m for m in ('diffusers', 'transformers') if m in sys.modules)\n"
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def source_files() -> list[str]:
    """The files of the source tree a build sees: git's tracked and untracked-but-not-ignored files."""
    proc = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout: the source file list is unknown")
    return [f for f in proc.stdout.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the source tree, built from a copy of its files (setuptools reuses a stale build/
    folder in place, which could smuggle old files into the wheel)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for f in source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("x2edit-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_name_and_all_package_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"x2edit"}
    info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    assert zipfile.ZipFile(wheel).read(f"{info}/top_level.txt").decode().split() == ["x2edit"]
    assert "x2edit = x2edit.cli:main" in zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    # Every file of the package's source ships: code and data alike (the embedded model, the measured
    # kernel tables, the training presets and recipes, the retrieval models).
    shipped = set(names)
    missing = sorted(f for f in source_files() if f.startswith("x2edit/") and "__pycache__" not in f
                     and f not in shipped)
    assert not missing, f"files of x2edit/ missing from the wheel: {missing}"
    for data in ("x2edit/models/x2edit-tiny/transformer/diffusion_pytorch_model.safetensors",
                 "x2edit/kernels/measured/nvidia-h200.json", "x2edit/training/presets/x2edit_upstream.yaml",
                 "x2edit/training/recipes/tiny_gpu.sh", "x2edit/retrieval/models/x2edit-tiny-gate.safetensors"):
        assert data in shipped


@pytest.mark.slow
def test_the_installed_wheel_edits_beside_hugging_face_kernels(wheel, tmp_path):
    """Installed from the wheel and run from a folder outside the repository, as a user runs it: the
    embedded model edits, and a site-packages `kernels` (Hugging Face's, which transformers >= 5.25
    installs) neither shadows ours nor is shadowed."""
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = f"""
import importlib.util, sys
import x2edit
assert x2edit.__file__.startswith({str(target)!r}), x2edit.__file__
from x2edit import kernels
assert kernels.lora_linear
spec = importlib.util.find_spec("kernels")
assert spec is None or not spec.origin.startswith({str(target)!r}), spec
from diffusers import FluxKontextPipeline  # imports Hugging Face's kernels where it is installed
from PIL import Image
from x2edit.registry import load_pipeline
pipe = load_pipeline("x2edit-tiny")
pipe.set_progress_bar_config(disable=True)
out = pipe(image=Image.new("RGB", (96, 64), "white"), prompt="make the background blue").images[0]
print(out.mode, out.size[0] / out.size[1])
"""
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["RGB", "1.5"]  # an image, of the source's aspect ratio
