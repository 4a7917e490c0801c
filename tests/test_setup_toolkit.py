"""setup.py's CUDA toolkit finder, on fake toolkits: a wrapper script named nvcc on the PATH (as
/usr/local/bin/nvcc on the GPU image), bad $CUDA_HOME values, and the build decisions."""

import importlib.util
import os
import stat

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("fsgld_setup", os.path.join(ROOT, "setup.py"))
setup_py = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_py)  # not __main__: defines the finder, runs no setup()


def _script(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _toolkit(root, with_cudart=True):
    """A fake toolkit whose nvcc answers --dryrun like the real one (`#$ TOP=<root>/bin/..`)."""
    _script(root / "bin" / "nvcc", f'echo "#$ _CUDART_=cudart"; echo "#$ TOP={root}/bin/.."\n')
    if with_cudart:
        (root / "lib64").mkdir(parents=True, exist_ok=True)
        (root / "lib64" / "libcudart.so").write_text("")
    return root


def _wrapper_on_path(tmp_path, root):
    """/usr/local/bin/nvcc on the GPU image: a script that execs the real nvcc elsewhere."""
    _script(tmp_path / "wrapbin" / "nvcc", f'exec {root}/bin/nvcc "$@"\n')
    return {"PATH": str(tmp_path / "wrapbin")}


def test_finds_the_toolkit_behind_a_wrapper_script(tmp_path):
    root = _toolkit(tmp_path / "cuda-13.0")
    env = _wrapper_on_path(tmp_path, root)
    home, how, _ = setup_py.find_cuda_home(env, fallback=str(tmp_path / "none"))
    assert home == str(root) and how.startswith("nvcc --dryrun")
    # torch's own guess, dirname(dirname(which nvcc)), is the wrapper's prefix: no libcudart there
    assert not setup_py.is_cuda_toolkit(str(tmp_path))


def test_cuda_home_wins_when_valid_and_is_skipped_when_not(tmp_path):
    root = _toolkit(tmp_path / "cuda-a")
    other = _toolkit(tmp_path / "cuda-b")
    env = {**_wrapper_on_path(tmp_path, other), "CUDA_HOME": str(root)}
    assert setup_py.find_cuda_home(env, fallback="/nonexistent")[:2] == (str(root), "$CUDA_HOME")
    no_lib = _toolkit(tmp_path / "cuda-nolib", with_cudart=False)
    env["CUDA_HOME"] = str(no_lib)
    home, how, rejected = setup_py.find_cuda_home(env, fallback="/nonexistent")
    assert home == str(other) and "nvcc --dryrun" in how
    assert any("$CUDA_HOME=" in r and "cuda-nolib" in r for r in rejected)


def test_cuda_path_and_fallback(tmp_path):
    root = _toolkit(tmp_path / "cuda-p")
    assert setup_py.find_cuda_home({"PATH": "", "CUDA_PATH": str(root)}, fallback="/nonexistent")[:2] == (
        str(root), "$CUDA_PATH")
    fallback = _toolkit(tmp_path / "usr-local-cuda")
    assert setup_py.find_cuda_home({"PATH": ""}, fallback=str(fallback))[0] == str(fallback)
    assert setup_py.find_cuda_home({"PATH": ""}, fallback="/nonexistent")[0] is None


def test_cuda_torch_without_toolkit_fails_unless_forced_cpu(tmp_path, capsys):
    env = {"PATH": ""}
    with pytest.raises(SystemExit, match="no CUDA toolkit"):
        setup_py.build_plan(env, torch_cuda="13.0", fallback="/nonexistent")
    assert setup_py.WARNING_MARKER in capsys.readouterr().err
    env["FSGLD_FORCE_CPU"] = "1"
    assert setup_py.build_plan(env, torch_cuda="13.0", fallback="/nonexistent") == (False, None)
    assert "FSGLD_FORCE_CPU=1" in capsys.readouterr().err


def test_cuda_torch_with_wrapped_nvcc_builds_cuda(tmp_path):
    root = _toolkit(tmp_path / "cuda-13.0")
    env = _wrapper_on_path(tmp_path, root)
    assert setup_py.build_plan(env, torch_cuda="13.0", fallback="/nonexistent") == (True, str(root))


def test_cpu_torch_with_nvcc_warns_loudly(tmp_path, capsys):
    env = _wrapper_on_path(tmp_path, _toolkit(tmp_path / "cuda-13.0"))
    assert setup_py.build_plan(env, torch_cuda=None, fallback="/nonexistent") == (False, None)
    err = capsys.readouterr().err
    assert setup_py.WARNING_MARKER in err and "CPU-only" in err
    assert setup_py.build_plan({"PATH": ""}, torch_cuda=None, fallback="/nonexistent") == (False, None)
    assert setup_py.WARNING_MARKER not in capsys.readouterr().err
