"""`python -m fsgld_fused`: clear errors for bad options, help with defaults, check's verdict, and a
main job that produces its figures before the optional demo."""

import re

import pytest
import torch

from fsgld_fused import __main__ as cli
from fsgld_fused import benchmark, demo


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bad_device_is_a_one_line_error(capsys):
    err = _error(capsys, ["bench", "--device", "nope"])
    assert "'nope' is not a device" in err and "Traceback" not in err
    assert "'nope' is not a device" in _error(capsys, ["check", "--device", "nope"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_a_one_line_error(capsys):
    err = _error(capsys, ["bench", "--device", "cuda"])
    assert ("CPU-only build" in err or "sees no GPU" in err) and "Traceback" not in err


def test_noise_must_be_a_fraction(capsys):
    assert "not a fraction in [0, 1)" in _error(capsys, ["demo", "--noise", "20"])
    assert "not a fraction in [0, 1)" in _error(capsys, ["demo", "--noise", "0.2", "1"])
    assert "not a number" in _error(capsys, ["demo", "--noise", "abc"])
    assert "positive integer" in _error(capsys, ["bench", "--repeat", "0"])
    assert "not a parameter count" in _error(capsys, ["bench", "--sizes", "16X"])


def test_help_shows_every_option_with_its_default(capsys):
    for command, options in (("check", ["--params", "--tensors"]), ("bench", ["--repeat", "--layout", "--dtypes"]),
                             ("demo", ["--lr", "--noise", "--epochs"])):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        for option in options:
            entry = out[out.index(f"\n  {option}"):].split("\n  -")[1]  # the option's help, wrapped lines too
            assert "(default:" in entry, (command, option, entry)


def test_sizes_accept_suffixes():
    args = cli.build_parser().parse_args(["bench", "--sizes", "16M,128M,1G,4096"])
    assert args.sizes == [16 << 20, 128 << 20, 1 << 30, 4096]


def test_check_prints_a_verdict_and_its_threshold(capsys):
    assert cli.main(["check", "--device", "cpu", "--params", "4000", "--tensors", "4"]) == 0
    out = capsys.readouterr().out
    assert f"pass <= {cli.CHECK_TOLERANCE:g}" in out
    assert re.search(rf"PASS: [1-9] backend\(s\) within {cli.CHECK_TOLERANCE:g} of the reference", out)


def test_check_fails_when_a_backend_differs(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_max_err", lambda *args: 1e-3)
    assert cli.main(["check", "--device", "cpu", "--params", "4000", "--tensors", "4"]) == 1
    assert "FAIL: a backend differs from the reference by more than 1e-05" in capsys.readouterr().out


def test_main_job_runs_check_bench_then_demo_and_skips_a_missing_dependency(capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(cli, "check", lambda args: ran.append("check") or 0)
    monkeypatch.setattr(benchmark, "main", lambda args: ran.append("bench") or 0)

    def no_sklearn(*args, **kwargs):
        raise ModuleNotFoundError("the demo needs scikit-learn: pip install scikit-learn", name="sklearn")

    monkeypatch.setattr(demo, "load_digits_split", no_sklearn)
    assert cli.main([]) == 0
    assert ran == ["check", "bench"]
    out = capsys.readouterr().out
    assert "skipped `demo --quick`: the demo needs scikit-learn" in out
    # run alone, the demo says the same and fails
    assert cli.main(["demo", "--quick"]) == 1
    assert "the demo needs scikit-learn" in capsys.readouterr().err
