"""Throwaway experiment driver: scan + purify variants + oracle on a CIFAR dev model."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipguard.components import RunContext, ShotSet
from clipguard.metrics import evaluate_pixels
from clipguard.model import load_model
from clipguard.prompts import PromptClassifier
from clipguard.triggers import BadNets, BadNetsConfig
from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.oracle import probe_ceiling, trigger_fidelity
from clipguard_cbpt.purifier import CBPTPurifier, CoOpConfig, CoOpPurifier, PurifyConfig
from clipguard_cbpt.scanner import CBPTScanner

model_path = sys.argv[1]
what = sys.argv[2]
opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
root = Path("/tmp/cg_cache/cifar10")
classes = sorted(p.name for p in (root / "train").iterdir())
X, Y = torch.load("/tmp/cg_cache/cifar_train.pt")
g = torch.Generator().manual_seed(0)
idx = torch.cat(
    [torch.nonzero(k == Y).flatten()[torch.randperm(5000, generator=g)[:16]] for k in range(10)]
)
torch.set_num_threads(2)
shots = ShotSet(X[idx].float() / 255, Y[idx].clone(), classes)
tcache = Path("/tmp/cg_cache/cifar_test1000.pt")
if tcache.exists():
    TX, TY = torch.load(tcache)
else:
    xs, ys = [], []
    for k, c in enumerate(classes):
        for f in sorted((root / "test" / c).iterdir())[:100]:
            xs.append(np.asarray(Image.open(f).convert("RGB")))
            ys.append(k)
    TX = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255
    TY = torch.tensor(ys)
    torch.save((TX, TY), tcache)
b = load_model(model_path)
real = BadNets().build(BadNetsConfig(size=3), 32)
target = classes.index("deer")
base = PromptClassifier(b, classes)
ev = evaluate_pixels(base.predict, TX, TY, real, target)
print(f"before: CA {ev.clean_accuracy:.4f} ASR {ev.attack_success_rate:.4f}", flush=True)
out = Path("/tmp/cbpt_dev/out") / (Path(model_path).stem + "-" + what)
out.mkdir(parents=True, exist_ok=True)
if what == "ncscan":
    from clipguard_cbpt.nc import NCScanConfig, NCScanner

    ctx = RunContext(seed=0)
    t = time.time()
    o = NCScanner().scan(b, shots, NCScanConfig(**opts), ctx)
    print(f"ncscan {time.time() - t:.1f}s stages {ctx.stage_seconds}")
    print(o.verdict, round(o.score, 3), o.target_class, o.explanation)
    print(json.dumps(o.statistics, indent=1, default=str))
    for k, v in o.artifacts.items():
        (out / k).write_bytes(v)
    print("fidelity", trigger_fidelity(b, TX[:500], real, o.trigger.trigger))
elif what == "scan":
    ctx = RunContext(seed=opts.pop("seed", 0))
    t = time.time()
    n0 = b.image_encoder_images
    o = CBPTScanner().scan(b, shots, ScanConfig(**opts), ctx)
    print(
        f"scan {time.time() - t:.1f}s images {b.image_encoder_images - n0}",
        f"stages {ctx.stage_seconds}",
    )
    print(o.verdict, round(o.score, 3), o.target_class, o.explanation)
    st = dict(o.statistics)
    dist = st.pop("class_distribution")
    print("top3", sorted(dist.items(), key=lambda kv: -kv[1])[:3])
    print(json.dumps(st, indent=1, default=str))
    for k, v in o.artifacts.items():
        (out / k).write_bytes(v)
    fid = trigger_fidelity(b, TX[:500], real, o.trigger.trigger)
    print("fidelity", fid)
elif what == "purify":
    from clipguard.triggers import load_trigger_file

    trig = load_trigger_file(Path(opts.pop("trigger"))) if "trigger" in opts else None
    if opts.pop("real_trigger", False):
        from clipguard.triggers import TriggerFile

        trig = TriggerFile(real, b.sha256, classes)
    name = opts.pop("purifier", "cbpt")
    ctx = RunContext(seed=0)
    t = time.time()
    if name == "coop":
        o = CoOpPurifier().purify(b, shots, CoOpConfig(**opts), ctx)
    else:
        o = CBPTPurifier().purify(b, shots, PurifyConfig(**opts), ctx, trigger=trig)
    ev2 = evaluate_pixels(o.classifier.predict, TX, TY, real, target)
    print(f"purify {name} {opts}: {time.time() - t:.1f}s stages {ctx.stage_seconds}")
    print(
        f"after: CA {ev2.clean_accuracy:.4f} ASR {ev2.attack_success_rate:.4f}",
        f"(before CA {ev.clean_accuracy:.4f} ASR {ev.attack_success_rate:.4f})",
        f"target {o.trigger_target}",
    )
    print(
        {
            k: v
            for k, v in o.statistics.items()
            if k in ("loss_first", "loss_last", "feature_encoder_images")
        }
    )
elif what == "oracle":
    half = 500
    c = probe_ceiling(b, classes, TX[::2], TY[::2], TX[1::2], TY[1::2], real, target, steps=300)
    print("oracle", c.as_dict())
