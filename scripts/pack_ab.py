"""DDP statistics buffer: ``distributed.pack`` + ``unpack`` of one ResNet-18 step, old copy vs
the working tree (CPU, median of 50).

    .venv/bin/python scripts/pack_ab.py OLD_DIR

``OLD_DIR`` holds an older package as ``laf_orig`` (made as in ``scripts/bench_ab.py``).
"""
import sys, time, statistics, warnings, torch, torchvision, torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
import laf_orig, laf_orig.distributed as od
from lightning_adafisher import AdaFisher
import lightning_adafisher.distributed as nd
torch.set_num_threads(2)
warnings.simplefilter("ignore")
x = torch.randn(32, 3, 32, 32); y = torch.randint(0, 10, (32,))
def prep(cls):
    torch.manual_seed(0); m = torchvision.models.resnet18(num_classes=10); o = cls(m)
    F.cross_entropy(m(x), y).backward(); p = o.collector.consume()
    for st in p.values(): st.h_total; st.s_total
    return o.collector.layers, p
lo, po = prep(laf_orig.AdaFisher); ln, pn = prep(AdaFisher)
cpu = torch.device("cpu")
ts = {"old": [], "new": []}
for _ in range(50):
    t = time.perf_counter(); od.unpack(lo, od.pack(lo, po, cpu)); ts["old"].append(time.perf_counter() - t)
    t = time.perf_counter(); nd.unpack(ln, nd.pack(ln, pn, cpu)); ts["new"].append(time.perf_counter() - t)
for k, v in ts.items(): print(k, f"pack+unpack {1e3*statistics.median(v):.3f} ms")
