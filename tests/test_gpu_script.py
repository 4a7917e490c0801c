"""bench/gpu.sh --dry-run: the GPU run's one command, walked on this CPU machine so it cannot rot.

The same steps as on a lent GPU (build check, GPU tests, check, the benchmark, ncu, the table),
at tiny sizes with no GPU rows; the out folder must hold the same files and JSON shape."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fsgld_fused import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = {"dtype", "layout", "params", "tensors", "variant", "bytes_per_param", "median_s", "min_s", "iqr_s",
            "achieved_GBps", "copy_fraction", "x_sgd_fused"}


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_dry_run_walks_both_stages(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "FSGLD_COMMIT": "0123456789abcdef-test"}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["bench-stage.json", "bench-stage.log", "bench.json", "bench.png", "build-test.json",
                     "build-test.log"] or files == ["bench-stage.json", "bench-stage.log", "bench.json",
                                                    "build-test.json", "build-test.log"]  # no matplotlib: no PNG
    assert len(files) <= 8  # what the device tool returns from $OUT

    stages = {name: json.load(open(out / f"{name}.json")) for name in ("build-test", "bench-stage")}
    for stage in stages.values():
        assert stage["commit"] == "0123456789abcdef-test"
        assert {"device", "driver", "versions", "machine"} <= set(stage)
        assert all(s["result"] in ("ok", "skipped") for s in stage["steps"]), stage["steps"]
    assert [s["name"] for s in stages["build-test"]["steps"]] == ["build", "pytest -m gpu", "check",
                                                                 "pytest (CPU subset)"]
    assert [s["name"] for s in stages["bench-stage"]["steps"]] == ["build", "bench", "ncu"]

    result = json.load(open(out / "bench.json"))
    assert result["schema"] == benchmark.SCHEMA and result["finished"] is True
    assert result["commit"] == "0123456789abcdef-test"
    assert set(result["versions"]) >= {"torch", "cuda", "triton", "python"}
    assert result["ncu"] == {"skipped": "dry run: no GPU"}
    rows = result["runs"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert not any(r["variant"] in ("FSGLD cuda", "FSGLD triton") for r in rows)
    measured = [r for r in rows if "median_s" in r]
    for r in measured:
        assert ROW_KEYS <= set(r), r
        assert r["min_s"] <= r["median_s"] and r["iqr_s"] >= 0
    by = {(r["dtype"], r["variant"]): r for r in measured}
    for dtype in ("float32", "bfloat16"):
        assert {"device copy", "SGD fused", "FSGLD cpu", "naive fSGLD (eager)"} <= {v for d, v in by if d == dtype}
        assert by[(dtype, "SGD fused")]["x_sgd_fused"] == 1.0
    assert by[("float32", "FSGLD cpu")]["bytes_per_param"] == 12
    assert by[("bfloat16", "FSGLD cpu")]["bytes_per_param"] == 12 and by[("bfloat16", "FSGLD cpu")]["master_weights"]
    # the short table is printed last
    tail = res.stdout.strip().splitlines()
    assert tail[-1].startswith("gpu.sh: all steps passed")
    assert any("FSGLD cpu" in line for line in tail[-30:])


def test_bytes_model():
    b = benchmark.bytes_per_param
    assert [b(v, 4, False) for v in ("SGD fused", "SGD foreach m=0.9", "Adam fused", "FSGLD cuda", "device copy")] \
        == [12, 20, 28, 12, 8]
    assert b("FSGLD triton", 2, True) == 12 and b("FSGLD auto (defaults)", 4, False) == 16
    assert b("naive fSGLD (eager)", 4, False) == 56 and b("naive fSGLD (torch.compile)", 2, False) == 10


def _args(tmp_path, **kw):
    parser = __import__("argparse").ArgumentParser()
    benchmark.add_arguments(parser)
    argv = ["--device", "cpu", "--sizes", "4K", "--layout", "flat", "--repeat", "2", "--include", "",
            "--out", str(tmp_path / "b.json")]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return parser.parse_args(argv)


def test_json_is_written_after_every_row(tmp_path, monkeypatch):
    written = []
    real = benchmark.write_json

    def spy(path, result):
        real(path, result)
        written.append(len(json.load(open(path))["runs"]))

    monkeypatch.setattr(benchmark, "write_json", spy)
    result = benchmark.run(_args(tmp_path))
    n = len(result["runs"])
    assert n >= 5
    assert written[-1] == n and list(range(n + 1)) == sorted(set(written))
    assert not any(name.endswith(".tmp") or ".tmp" in name for name in os.listdir(tmp_path))


def test_time_budget_skips_rows_and_says_so(tmp_path):
    result = benchmark.run(_args(tmp_path, budget_s=1e-9))
    assert result["runs"] and all(r.get("skipped", "").startswith("time budget") for r in result["runs"])
    assert result["finished"] is True


def test_commit_from_environment(monkeypatch):
    monkeypatch.setenv("FSGLD_COMMIT", "abc123")
    assert benchmark.git_commit() == "abc123"
    monkeypatch.delenv("FSGLD_COMMIT")
    assert benchmark.git_commit()  # git rev-parse, or "unknown" without .git
