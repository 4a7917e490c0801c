"""Benchmark script: the same as `python -m fsgld_fused bench` (JSON + PNG under bench/results/).

    python bench/run_bench.py --quick                       # CI-sized, any machine
    python bench/run_bench.py --device cpu --layout both    # 1M .. 64M params on CPU
    python bench/run_bench.py --device cuda                 # 16M, 128M, 1G params on a GPU
"""

import argparse
import sys

from fsgld_fused import benchmark

if __name__ == "__main__":
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """The usage examples as written, every option with its default."""

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    benchmark.add_arguments(parser)
    sys.exit(benchmark.main(parser.parse_args()))
