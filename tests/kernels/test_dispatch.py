"""The dispatch point: backend setting, environment variable, auto choice and refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from x2edit import kernels
from x2edit.kernels import dispatch

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}  # the installed package, as a user imports it
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120
    )


def test_import_does_not_import_triton():
    proc = run_python(
        "import sys; from x2edit import kernels; kernels.lora_linear\n"
        "assert 'triton' not in sys.modules, 'triton imported'; print('ok')"
    )
    assert proc.returncode == 0, proc.stderr
    # and the torch path does not need it either
    code = (
        "import sys, torch\nfrom x2edit import kernels\n"
        "x = torch.randn(3, 4); w = torch.randn(5, 4); A = torch.randn(1, 2, 4); B = torch.randn(1, 5, 2)\n"
        "kernels.lora_linear(x, w, None, A, B)\n"
        "assert 'triton' not in sys.modules\n"
    )
    proc = run_python(code, X2EDIT_KERNELS="auto")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("value,expected", [("torch", "torch"), ("TRITON", "triton"), ("", "auto")])
def test_environment_variable_sets_the_default(value, expected):
    proc = run_python("from x2edit import kernels; print(kernels.get_backend())", X2EDIT_KERNELS=value)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_bad_environment_variable_is_a_clear_error():
    proc = run_python("import x2edit.kernels", X2EDIT_KERNELS="cuda")
    assert proc.returncode != 0 and "X2EDIT_KERNELS" in proc.stderr and "choose one of" in proc.stderr


def test_set_and_use_backend_restore_the_previous_setting():
    before = kernels.get_backend()
    with kernels.use_backend("torch"):
        assert kernels.get_backend() == "torch"
        with kernels.use_backend("triton"):
            assert kernels.get_backend() == "triton"
        assert kernels.get_backend() == "torch"
    assert kernels.get_backend() == before
    with pytest.raises(ValueError, match="choose one of"):
        kernels.set_backend("cuda")
    with pytest.raises(RuntimeError), kernels.use_backend("torch"):
        raise RuntimeError("boom")
    assert kernels.get_backend() == before


def test_auto_takes_the_reference_for_cpu_tensors_and_a_torch_path_on_cuda():
    with kernels.use_backend("auto"):
        assert kernels.resolve_backend(torch.randn(2)) == "torch"
        assert kernels.resolve_backend(torch.randn(2, dtype=torch.float64)) == "torch"
        if torch.cuda.is_available():
            assert kernels.resolve_backend(torch.randn(4, 8, device="cuda")) in ("addmm", "merge")
            assert kernels.resolve_backend(torch.randn(2, device="cuda", dtype=torch.float64)) == "torch"


@pytest.mark.parametrize("name", ["triton", "triton_tma"])
def test_forcing_triton_where_it_cannot_run_is_refused(monkeypatch, name):
    x = torch.randn(2)
    with kernels.use_backend(name):
        monkeypatch.setattr(dispatch, "triton_available", lambda: False)
        with pytest.raises(ImportError, match=r"x2edit\[triton\]"):
            kernels.resolve_backend(x)
        monkeypatch.setattr(dispatch, "triton_available", lambda: True)
        with pytest.raises(RuntimeError, match="supports"):
            kernels.resolve_backend(x.double())
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            kernels.resolve_backend(x)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert kernels.resolve_backend(x) == name


def test_torch_backend_is_the_reference():
    x, w, b = torch.randn(4, 6), torch.randn(3, 6), torch.randn(3)
    A, B, g = torch.randn(2, 2, 6), torch.randn(2, 3, 2), torch.rand(4, 2)
    with kernels.use_backend("torch"):
        y = kernels.lora_linear(x, w, b, A, B, g, 0.5)
    torch.testing.assert_close(y, kernels.lora_linear_reference(x, w, b, A, B, g, 0.5), atol=0, rtol=0)


def test_backends_do_not_import_the_dispatch_point():
    # dispatch imports the backends (lazily); a backend importing dispatch back makes a cycle.
    # The shared facts (interpreter, triton installed, GPU name) live one floor down, in kernels.env.
    import ast

    for path in sorted(Path(kernels.__file__).parent.glob("*.py")):
        if path.name in ("__init__.py", "dispatch.py"):
            continue
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {"x2edit.kernels.dispatch", "x2edit.kernels"} & imported, path.name
        assert not any(n.module == "x2edit" and "kernels" in {a.name for a in n.names}
                       for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)), path.name
