"""Benchmark script: the same as `python -m fsgld_fused bench` (JSON + PNG under bench/results/).

    python bench/run_bench.py --quick                       # CI-sized, any machine
    python bench/run_bench.py --device cpu --layout both    # 1M .. 64M params on CPU
    python bench/run_bench.py --device cuda                 # 16M, 128M, 1G params on a GPU
"""

import sys

from fsgld_fused import _cli, benchmark

if __name__ == "__main__":
    parser = _cli.Parser(description=__doc__, formatter_class=_cli.HelpFormatter)
    benchmark.add_arguments(parser)
    sys.exit(benchmark.main(parser.parse_args()))
