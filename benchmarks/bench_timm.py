"""Measure this project's GC ViT against timm 1.0.31's in one run; `gcvit bench` runs the same code.

python benchmarks/bench_timm.py --models gcvit_tiny --train-models gcvit_xxtiny gcvit_tiny
"""

from gcvit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *__import__("sys").argv[1:]]))
