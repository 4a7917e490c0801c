"""Every python block of README.md runs in a test: each is marked `<!-- test: NAME -->` and some
test runs `readme_snippet("NAME")`. The blocks without a home elsewhere run here, on CPU (a
"cuda" device in a block is read as "cpu" where no GPU is present)."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _readme import README, readme_snippet

TESTS = Path(__file__).resolve().parent


def test_every_python_block_is_marked_and_run_by_a_test():
    text = README.read_text()
    blocks = re.findall(r"^```python\n", text, re.M)
    names = re.findall(r"<!-- test: ([\w-]+) -->\s*\n```python\n", text)
    assert len(names) == len(blocks), "a ```python block in README.md lacks its <!-- test: NAME --> marker"
    run = set()  # the names a test file that calls readme_snippet spells out (some pass them in a variable)
    for path in TESTS.glob("*.py"):
        code = path.read_text()
        if "readme_snippet(" in code and path.name != "_readme.py":
            run |= {name for name in names if f'"{name}"' in code}
    assert set(names) <= run, f"README blocks no test runs: {sorted(set(names) - run)}"


def _on_this_machine(code: str) -> str:
    return code if torch.cuda.is_available() else code.replace('"cuda"', '"cpu"')


def _mlp(classes=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes))


def _batches(n, classes=3, batch=8):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 6, generator=gen), torch.randint(0, classes, (batch,), generator=gen))
            for _ in range(n)]


def test_training_loop():
    model, seen = _mlp(), []
    ns = {"model": model, "loader": _batches(5), "loss_fn": F.cross_entropy,
          "evaluate": lambda m: seen.append([p.detach().clone() for p in m.parameters()])}
    exec(readme_snippet("training"), ns)
    opt = ns["opt"]
    assert opt.step_count == 5 and opt.is_perturbed  # perturbed again after evaluating
    with opt.unperturbed():
        assert all(torch.equal(a, b) for a, b in zip(seen[0], model.parameters()))


def test_amp_low_precision_and_capturable_blocks():
    from fsgld_fused import FSGLD

    model = _mlp()
    x, y = _batches(1)[0]
    ns = {"torch": torch, "model": model, "x": x, "y": y, "loss_fn": F.cross_entropy,
          "opt": FSGLD(model.parameters(), lr=1e-2, beta=1e8)}
    exec(_on_this_machine(readme_snippet("amp")), ns)
    assert ns["opt"].step_count == 1
    ns = {"torch": torch, "model": _mlp(), "FSGLD": FSGLD}
    exec(readme_snippet("low-precision"), ns)
    assert ns["model"][0].weight.dtype == torch.bfloat16 and ns["opt"].param_groups[0]["master_weights"]
    ns = {"torch": torch, "model": _mlp(), "FSGLD": FSGLD}
    exec(_on_this_machine(readme_snippet("capturable")), ns)
    assert ns["opt"].capturable and isinstance(ns["lr"], torch.Tensor)


def test_compile_block(monkeypatch):
    from fsgld_fused import FSGLD

    # the block as written, through Dynamo; the eager backend spares 2 cores Inductor's C++ build
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: real(fn, backend="eager", **kw))
    model = _mlp()
    x, y = _batches(1)[0]
    ns = {"torch": torch, "model": model, "loss_fn": F.cross_entropy,
          "opt": FSGLD(model.parameters(), lr=1e-2, beta=1e8, nonfinite="ignore")}
    exec(readme_snippet("compile"), ns)
    for _ in range(2):
        ns["train_step"](x, y)
    assert ns["opt"].step_count == 2


def test_bayesian_block():
    model = _mlp()
    data = _batches(41)
    x_test, y_test = data[40]
    ns = {"model": model, "train_set": range(320), "T": 40, "batches": iter(data[:40]), "loss_fn": F.cross_entropy,
          "x_test": x_test, "y_test": y_test, "x_ood": 3 * torch.randn(8, 6)}
    exec(readme_snippet("bayes"), ns)
    assert len(ns["samples"]) == 12 and not ns["opt"].is_perturbed
    assert ns["log_p_ood"].shape == (8, 3) and 0.0 <= ns["ood"] <= 1.0
    assert math.isfinite(ns["tr_h"]) and math.isfinite(ns["lam"])


def test_install_commands_name_extras_that_exist_and_no_index_package():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    extras = set(tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    text = README.read_text()
    commands = re.findall(r"pip install [^\n`]*", text)
    assert commands
    for cmd in commands:
        # the package is on no index: a requirement by name needs a path or a git URL
        assert not re.search(r'(?<![@\w/.])"?fsgld-fused(\[[\w,]+\])?"?(\s|$)', cmd) or "@ git+" in cmd, cmd
        for group in re.findall(r"\[([\w,]+)\]", cmd):
            assert set(group.split(",")) <= extras, (cmd, extras)
