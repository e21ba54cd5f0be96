"""Whole-model A/B of the CPU attention routes: PyTorch's fused kernel (`scaled_dot_product_attention`) everywhere
against the routes `gcvit.layers.attention` picks on the CPU (`attention_route("fused")` against "auto", which
`gcvit.layers.cpu_attention.auto_route` decides). The two alternate forward by forward in one process, so machine
drift hits both alike; prints the median of each and the max difference of their outputs.

python benchmarks/attention_route.py --model gcvit_tiny --batch 16 --dtype fp32 --repeats 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gcvit
from gcvit.allocator import keep_freed_memory
from gcvit.layers import attention_route


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gcvit_tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    model = gcvit.create_model(args.model).eval()
    x = torch.randn(args.batch, 3, *model.cfg.img_size)

    def forward(fused: bool) -> torch.Tensor:
        with (
            attention_route("fused" if fused else "auto"),
            torch.inference_mode(),
            torch.autocast("cpu", torch.bfloat16, enabled=args.dtype == "bf16"),
        ):
            return model(x)

    diff = (forward(True).float() - forward(False).float()).abs().max().item()
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.repeats):
        for fused in (True, False) if i % 2 else (False, True):
            start = time.perf_counter()
            forward(fused)
            times[fused].append(time.perf_counter() - start)
    fused_s, chosen_s = statistics.median(times[True]), statistics.median(times[False])
    print(f"{args.model} {args.dtype} batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"fused kernel everywhere {fused_s:.3f} s, as chosen {chosen_s:.3f} s a forward (median of {args.repeats}); "
        f"as chosen is {fused_s / chosen_s:.2f}x as fast; max output difference {diff:.1e}"
    )


if __name__ == "__main__":
    main()
