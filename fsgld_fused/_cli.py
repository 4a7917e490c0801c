"""Argument types of the command line: a clear one-line error instead of a traceback."""

from __future__ import annotations

import argparse
import sys

import torch

from ._files import check_output_file, replace_file  # noqa: F401  (the commands write through these)


class Parser(argparse.ArgumentParser):
    """An argument error is one line on stderr (exit status 2), not the usage block and then the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option with its default, unless its help already says it (or it has none to say); the
    description as written."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


def output_file(text: str) -> str:
    """argparse type of an output path: check_output_file's rule as a one-line usage error."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    try:
        check_output_file(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def fail(message: str) -> None:
    """A one-line error from a command, after its arguments parsed: stderr, exit status 2."""
    print(f"python -m fsgld_fused: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def device(text: str) -> torch.device:
    """A device this torch can run on: cpu, cuda or cuda:N (with a CUDA build and a visible GPU)."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    if torch.version.cuda is None:
        raise argparse.ArgumentTypeError(f"{text!r}: this torch ({torch.__version__}) is a CPU-only build; "
                                         "use --device cpu, or install a CUDA build of torch")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch has CUDA {torch.version.cuda} but sees no GPU "
                                         "(driver, CUDA_VISIBLE_DEVICES?); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fraction(text: str) -> float:
    """A fraction in [0, 1), such as a label-noise rate (0.2 is 20%)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1) (write 0.2 for 20%)")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def size_list(text: str) -> list[int]:
    """Comma-separated parameter counts, with optional K/M/G suffixes (binary: 16M = 16 * 2**20)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("no parameter count given (e.g. 16M or 1048576,4194304)")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    out = []
    for word in text.split(","):
        word = word.strip()
        try:
            out.append(int(word[:-1]) * scale[word[-1].upper()] if word[-1:].upper() in scale else int(word))
        except (ValueError, IndexError):
            raise argparse.ArgumentTypeError(f"{word!r} is not a parameter count (e.g. 1048576 or 16M)") from None
        if out[-1] <= 0:
            raise argparse.ArgumentTypeError(f"{word!r}: a parameter count must be positive")
    return out
