import time, statistics, torch
torch.set_num_threads(2)
def red(x, w):
    return (x.reshape(1, -1).float() * w.float()).sum(dim=-1).to(x.dtype)
f = torch.compile(red, dynamic=False, fullgraph=True)
for (o, i) in ((151936, 896), (4864, 896), (896, 4864), (896, 896), (128, 896)):
    ws = [torch.randn(o, i).to(torch.bfloat16) for _ in range(max(1, 600_000_000 // (o * i * 2)))]
    x = torch.randn(1, 1, i).to(torch.bfloat16)
    with torch.inference_mode():
        for w in ws[:2]: f(x, w); torch.nn.functional.linear(x, w)
        for name, fn in (("reduction", f), ("F.linear", torch.nn.functional.linear), ("sum-read", None)):
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                for w in ws:
                    fn(x, w) if fn else w.sum()
                ts.append((time.perf_counter() - t) / len(ws))
            s = statistics.median(ts)
            print(f"{o}x{i} {name:10s} {s*1e3:8.3f} ms  {o*i*2/s/1e9:6.1f} GB/s")
