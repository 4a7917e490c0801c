"""`python -m fsgld_fused`: clear errors for bad options, help with defaults, check's verdict, and a
main job that produces its figures before the optional demo."""

import os
import re
import stat

import pytest
import torch

from fsgld_fused import __main__ as cli
from fsgld_fused import _cli, benchmark, demo


def _error(capsys, argv):
    """The error of a refused command line: exit status 2, one line on stderr, nothing on stdout."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "error: " in err and "Traceback" not in err, err
    assert out == ""
    return err


# A bench that runs in a second if the output-path rule failed to stop it.
TINY_BENCH = ["bench", "--device", "cpu", "--sizes", "4K", "--layout", "flat", "--repeat", "1", "--include", ""]


def test_a_fifo_is_never_replaced_by_an_output(capsys, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for argv in (TINY_BENCH + ["--out", str(fifo)], TINY_BENCH + ["--quick", "--out", str(fifo)],
                 ["sass", "--json", str(fifo)]):
        assert f"{fifo} is a FIFO" in _error(capsys, argv)
        assert stat.S_ISFIFO(os.stat(fifo).st_mode), argv
    # the plot beside the JSON is checked before any work too: no JSON is written
    os.mkfifo(tmp_path / "b.png")
    assert "is a FIFO" in _error(capsys, TINY_BENCH + ["--out", str(tmp_path / "b.json")])
    assert stat.S_ISFIFO(os.stat(tmp_path / "b.png").st_mode) and not (tmp_path / "b.json").exists()
    assert "is a directory" in _error(capsys, TINY_BENCH + ["--out", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["b.png", "fifo"]  # no temporary file left behind


def test_output_paths_a_command_may_write(tmp_path):
    # only a stat: /dev/null itself is never opened
    for path, kind in (("/dev/null", "a character device"), (str(tmp_path), "a directory")):
        with pytest.raises(ValueError, match=kind):
            _cli.check_output_file(path)
    regular = tmp_path / "old.json"
    regular.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(regular)
    assert _cli.check_output_file(str(regular)) == str(regular)
    assert _cli.check_output_file(str(link)) == str(regular)  # a link writes the file it names
    assert _cli.check_output_file(str(tmp_path / "new" / "x.json")) == str(tmp_path / "new" / "x.json")
    with pytest.raises(ValueError, match="is not a directory"):
        _cli.check_output_file(str(regular / "x.json"))
    _cli.replace_file(str(link), "new")
    assert link.is_symlink() and regular.read_text() == "new"


def test_sass_arguments_are_checked(capsys):
    assert "not an fsgld-fused checkout (no setup.py)" in _error(capsys, ["sass", "--source", "/nonexistent"])
    assert "'foo': choose from cuda, triton" in _error(capsys, ["sass", "--backends", "foo"])
    assert "'cuda,foo'" in _error(capsys, ["sass", "--backends", "cuda,foo"])


def test_quick_never_overrides_an_option_given(capsys):
    def plan(*argv):
        return benchmark.settings(cli.build_parser().parse_args(["bench", *argv]), torch.device("cpu"))

    assert plan("--quick") == ([1 << 20, 1 << 22], 3, set())
    assert plan("--quick", "--sizes", "64K", "--repeat", "9", "--include", "compile") == ([1 << 16], 9, {"compile"})
    assert plan() == ([1 << 20, 1 << 22, 1 << 24, 1 << 26], 7, {"compile"})
    assert plan("--sizes", "4K", "--include", "") == ([4096], 7, set())
    assert "no parameter count given" in _error(capsys, ["bench", "--sizes", ""])


def test_usage_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "{main,check,bench,demo,sass}" in out.splitlines()[0]


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
    bench_options = ["--repeat", "--layout", "--dtypes", "--sizes", "--include"]
    for command, options in (("check", ["--params", "--tensors"]), ("bench", bench_options),
                             ("demo", ["--lr", "--noise", "--epochs"])):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        for option in options:
            entry = out[out.index(f"\n  {option}"):].split("\n  -")[1]  # the option's help, wrapped lines too
            assert " ".join(entry.split()).count("(default:") == 1, (command, option, entry)
        assert "(default: None)" not in out and "(default: [])" not in out


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
    # the last line: the verdict and each part's status
    assert out.rstrip().splitlines()[-1] == "main job: PASS (check PASS, bench PASS, demo skipped (sklearn missing))"
    monkeypatch.setattr(benchmark, "main", lambda args: 1)
    assert cli.main([]) == 1
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("main job: FAIL (check PASS, bench FAIL,")
    # run alone, the demo says the same and fails
    assert cli.main(["demo", "--quick"]) == 1
    assert "the demo needs scikit-learn" in capsys.readouterr().err


def test_demo_trains_on_one_thread_and_gives_the_threads_back(monkeypatch):
    seen = []
    monkeypatch.setattr(demo, "run", lambda args: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    assert cli.main(["demo", "--quick"]) == 0
    assert seen == [1] and torch.get_num_threads() == before


def _measurement(times):
    from torch.utils.benchmark import Measurement
    from torch.utils.benchmark.utils.common import TaskSpec

    return Measurement(number_per_run=1, raw_times=list(times), task_spec=TaskSpec(stmt="step", setup=""))


def test_a_ratio_inside_the_spread_is_flagged(capsys, monkeypatch):
    from fsgld_fused.baselines import spread_hides_difference

    base = _measurement([1.0, 1.1, 1.2, 1.3, 1.4])  # IQR 0.2
    assert spread_hides_difference(_measurement([1.3, 1.4, 1.5, 1.6, 1.7]), base)  # 0.3 apart, IQRs 0.4
    assert not spread_hides_difference(_measurement([1.6, 1.7, 1.8, 1.9, 2.0]), base)  # 0.6 apart
    assert not spread_hides_difference(_measurement([0.1, 0.1, 0.1, 0.1, 0.1]), base)  # faster, resolved

    for times, flagged in (([1.3, 1.4, 1.5, 1.6, 1.7], True), ([3.0] * 5, False)):
        calls = []  # check times SGD for-loop, foreach (far from the base here), then fused (the base)

        def fake(fn, *args, times=times, **kw):
            calls.append(fn)
            base_times = [1.0, 1.1, 1.2, 1.3, 1.4]
            return _measurement([5.0] * 5 if len(calls) < 3 else base_times if len(calls) == 3 else times)

        monkeypatch.setattr(cli, "measure", fake)
        monkeypatch.setattr(cli, "_max_err", lambda *args: 0.0)
        monkeypatch.setattr(cli.os, "getloadavg", lambda flagged=flagged: (100.0 if flagged else 0.0, 0.0, 0.0))
        assert cli.main(["check", "--device", "cpu", "--params", "4000", "--tensors", "4"]) == 0
        out = capsys.readouterr().out
        assert "IQR ms" in out and ("~: the IQRs of the row and of SGD fused together exceed" in out) == flagged
        assert ("note: load average 100.0" in out) == flagged  # a loaded machine is named
        line = next(l for l in out.splitlines() if l.startswith("FSGLD backend=cpu"))
        assert line.endswith("~") == flagged, line


def test_bench_refuses_an_unknown_include(capsys):
    assert "--include compiel: choose from compile, reference" in _error(capsys, TINY_BENCH[:-1] + ["compiel"])


def test_bench_bf16_rows_with_and_without_masters(tmp_path):
    """bfloat16: FSGLD with fp32 masters (12 B/param); bfloat16-sr: without, rounded stochastically
    (6 B/param, as SGD's bf16 step)."""
    import json

    out = tmp_path / "bench.json"
    cli.main(TINY_BENCH + ["--dtypes", "bfloat16,bfloat16-sr", "--variants", "SGD fused,FSGLD cpu", "--out", str(out)])
    rows = {(r["dtype"], r["variant"]): r for r in json.loads(out.read_text())["runs"]}
    assert rows[("bfloat16", "FSGLD cpu")]["master_weights"] and rows[("bfloat16", "FSGLD cpu")]["bytes_per_param"] == 12
    sr = rows[("bfloat16-sr", "FSGLD cpu")]
    assert not sr["master_weights"] and sr["bytes_per_param"] == 6 == rows[("bfloat16-sr", "SGD fused")]["bytes_per_param"]
    assert all("median_s" in r for r in rows.values()), rows


def test_gpu_report_writes_under_the_same_rule(tmp_path):
    import subprocess
    import sys

    fifo = tmp_path / "run.json"
    os.mkfifo(fifo)
    report = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bench", "gpu_report.py")
    res = subprocess.run([sys.executable, report, "env", str(fifo), "480", "build=95"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "is a FIFO" in res.stderr and stat.S_ISFIFO(os.stat(fifo).st_mode)
