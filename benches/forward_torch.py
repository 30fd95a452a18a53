#!/usr/bin/env python3
"""PyTorch side of `cargo bench --bench forward`: times a timm ViT-B/16 forward pass on CPU.

    python benches/forward_torch.py --size 224 --threads 2 --runs 5 [--model vit|beit]

Prints one line, `RESULT {json}`, with the per-run wall times and process CPU times (all
threads) in milliseconds, so the Rust benchmark can put them next to its own. Run it on its own to get the PyTorch figures alone.

Models (random weights, eval mode, fp32, batch 1, no autograd):

* `vit`  — timm `vit_base_patch16_224` (`img_size=` the size): the plain ViT-B/16 the MAE
  encoder is. Timed: `forward_intermediates(x, indices=[3,5,7,11], intermediates_only=True)`,
  the same four NCHW maps the MMSeg backbone returns.
* `beit` — timm `beit_base_patch16_224` with an absolute position embedding and layer scale,
  i.e. MMSeg's MAE backbone op for op (per-block relative-position bias, gamma_1/gamma_2).
  Timed: `forward_intermediates` with the same indices.

Threads: `torch.set_num_threads(N)`; OMP/MKL thread variables are set too, before torch is
imported, so no library brings its own pool size.
"""

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--model", choices=["vit", "beit"], default="vit")
    ap.add_argument(
        "--matmul",
        action="store_true",
        help="time only F.linear([T,768] x [3072,768]^T) and report GFLOP/s instead of ms",
    )
    args = ap.parse_args()

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.matmul:
        return matmul(args, torch)
    indices = [3, 5, 7, 11]
    if args.model == "vit":
        model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=args.size)
    else:
        model = timm.create_model(
            "beit_base_patch16_224",
            pretrained=False,
            img_size=args.size,
            use_abs_pos_emb=True,
            use_rel_pos_bias=True,
            init_values=0.1,
        )
    model.eval()
    x = torch.rand(1, 3, args.size, args.size) * 2 - 1

    def step():
        return model.forward_intermediates(x, indices=indices, intermediates_only=True)

    times, cpu = [], []
    with torch.inference_mode():
        out = None
        for _ in range(args.warmup):
            out = step()
        for _ in range(args.runs):
            c0, t0 = time.process_time(), time.perf_counter()
            out = step()
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        shapes = [list(o.shape) for o in out]
    print(
        "RESULT "
        + json.dumps(
            {
                "model": args.model,
                "size": args.size,
                "threads": torch.get_num_threads(),
                "times_ms": times,
                "cpu_ms": cpu,
                "shapes": shapes,
                "torch": torch.__version__,
                "timm": timm.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            }
        )
    )
    sys.stdout.flush()
    return 0


def matmul(args, torch) -> int:
    t = (args.size // 16) ** 2 + 1
    x = torch.ones(t, 768)
    w = torch.ones(3072, 768)
    reps = 10
    rates = []
    with torch.inference_mode():
        for _ in range(args.warmup):
            torch.nn.functional.linear(x, w)
        for _ in range(args.runs):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.linear(x, w)
            secs = (time.perf_counter() - t0) / reps
            rates.append(2.0 * t * 768 * 3072 / secs / 1e9)
    print("RESULT " + json.dumps({"model": "matmul", "size": args.size,
          "threads": torch.get_num_threads(), "times_ms": rates, "torch": torch.__version__,
          "timm": "-", "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
