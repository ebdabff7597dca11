"""Run: python bench/accelerate_overhead.py  (seconds).

Per-step cost of accelerate's wrappers (one process, no mixed precision): each call timed against
the plain torch call it wraps, on a tiny model, interleaved; best (minimum) of 25 bursts (process CPU time) of 400 calls
each, since the machine is shared and only the fastest burst shows the code's own cost."""
import argparse
import time

from common import run_main


def burst(fn, n=400):
    t = time.process_time()
    for _ in range(n): fn()
    return (time.process_time() - t) / n * 1e6


def main(argv=None) -> None:
    # No options: the parser is there so --help answers (and a stray argument is refused) before torch loads.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    import torch
    from accelerate import Accelerator

    torch.set_num_threads(1); torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(20)])
    o = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    acc = Accelerator(cpu=True)
    pm, po = acc.prepare(m, o)
    params = list(m.parameters())
    x = torch.randn(4, 16)
    def set_grads():
        for p in params: p.grad = torch.ones_like(p)
    set_grads()
    pairs = {
      "clip_grad_norm_": (lambda: torch.nn.utils.clip_grad_norm_(params, 1.0), lambda: acc.clip_grad_norm_(params, 1.0)),
      "optimizer.step": (lambda: o.step(), lambda: po.step()),
      "zero_grad+regrad": (lambda: (o.zero_grad(set_to_none=True), set_grads()), lambda: (po.zero_grad(set_to_none=True), set_grads())),
      "backward (scalar graph)": (lambda: (x.sum() * params[0].sum()).backward(), lambda: acc.backward(x.sum() * params[0].sum())),
      "forward": (lambda: m(x), lambda: pm(x)),
    }
    total = 0.0
    for name, (plain, wrapped) in pairs.items():
        a, b = [], []
        for _ in range(25):
            a.append(burst(plain)); b.append(burst(wrapped))
        total += min(b) - min(a)
        print(f"{name:<24} plain {min(a):8.1f} us  accelerate {min(b):8.1f} us  diff {min(b) - min(a):+7.1f} us")
    print(f"sum of differences: {total:+.1f} us per optimizer step")


if __name__ == "__main__":
    run_main(main)
