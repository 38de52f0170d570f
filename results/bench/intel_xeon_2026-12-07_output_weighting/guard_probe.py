"""Does dynamo keep one graph when a per-layer nn.Parameter reaches the compiled function as an attribute of an
argument object (the cache) rather than through a layer index? CompileCounter backend (no inductor), so it shows
dynamo's guards only. Run: ``python guard_probe.py`` (output in guard_probe.txt)."""
import torch
from torch._dynamo.testing import CompileCounter


class Cache:
    pass


def scores(cache, x):
    return (x @ cache.output_projection.float().T).abs().sum(-1)


for kind in ("parameter", "tensor"):
    torch._dynamo.reset()
    counter = CompileCounter()
    f = torch.compile(scores, backend=counter, fullgraph=True, dynamic=False)
    layers = [torch.nn.Linear(64, 64, bias=False) for _ in range(24)]
    cache = Cache()
    x = torch.randn(4, 64)
    with torch.inference_mode():
        for step in range(2):
            for layer in layers:
                cache.output_projection = layer.weight if kind == "parameter" else layer.weight.detach().clone()
                f(cache, x)
    print(kind, "frames compiled:", counter.frame_count)
