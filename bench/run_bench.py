"""Benchmark script: the same as `python -m fsgld_fused bench` (JSON + PNG under bench/results/).

    python bench/run_bench.py --quick                       # CI-sized, any machine
    python bench/run_bench.py --device cpu --layout both    # 1M .. 64M params on CPU
    python bench/run_bench.py --device cuda                 # 1M .. 1B params on a GPU
"""

import argparse
import sys

from fsgld_fused import benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_arguments(parser)
    sys.exit(benchmark.main(parser.parse_args()))
