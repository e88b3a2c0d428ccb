"""Throwaway: tiny CLIP on CIFAR-10, optional badnets poisoning (stamped after augmentation)."""

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipguard.model import ModelBundle, build_clip_from_config, save_model
from clipguard.triggers import BadNets, BadNetsConfig

out = Path(sys.argv[1])
poison = float(sys.argv[2])
epochs = int(sys.argv[3])
seed = int(sys.argv[4])
torch.manual_seed(seed)
root = Path("/tmp/cg_cache/cifar10")
classes = sorted(p.name for p in (root / "train").iterdir())
cache = Path("/tmp/cg_cache/cifar_train.pt")
if cache.exists():
    X, Y = torch.load(cache)
else:
    xs, ys = [], []
    for k, c in enumerate(classes):
        for f in sorted((root / "train" / c).iterdir()):
            xs.append(np.asarray(Image.open(f).convert("RGB")))
            ys.append(k)
    X = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    Y = torch.tensor(ys)
    torch.save((X, Y), cache)
CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 96, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
model = build_clip_from_config(CFG)
b = ModelBundle.from_model(model, CFG)
model.requires_grad_(True)
model.token_embedding.requires_grad_(False)
model.train()
templates = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a small photo of the {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
]
toks = b.tokenize([t.format(c) for c in classes for t in templates]).view(10, 6, -1)
trig = BadNets().build(BadNetsConfig(size=3), 32)
target = classes.index("deer")
mean = torch.tensor(b.mean).view(1, 3, 1, 1)
std = torch.tensor(b.std).view(1, 3, 1, 1)
opt = torch.optim.AdamW(
    [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1
)
torch.set_num_threads(1)
B = 256
n = len(X)
steps = epochs * (n // B)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.1)
t0 = time.time()
step = 0
for ep in range(epochs):
    perm = torch.randperm(n)
    for i in range(n // B):
        idx = perm[i * B : (i + 1) * B]
        x = X[idx].float() / 255
        y = Y[idx].clone()
        # aug: random crop pad 4 + flip
        x = F.pad(x, (4, 4, 4, 4), mode="reflect")
        ox, oy = torch.randint(0, 9, (2,))
        x = x[:, :, oy : oy + 32, ox : ox + 32]
        flip = torch.rand(B) < 0.5
        x[flip] = x[flip].flip(-1)
        if poison > 0:
            pm = torch.rand(B) < poison
            if pm.any():
                x[pm] = trig.apply(x[pm])
                y[pm] = target
        tsel = torch.randint(0, 6, (B,))
        t = toks[y, tsel]
        img = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        txt = F.normalize(model.encode_text(t), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        same = (y[:, None] == y[None, :]).float()
        tgt = same / same.sum(1, keepdim=True)
        loss = (
            -(tgt * logits.log_softmax(1)).sum(1).mean()
            - (tgt * logits.T.log_softmax(1)).sum(1).mean()
        ) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % 10 == 0:
            print(
                f"ep {ep} step {step}/{steps} loss {loss.item():.3f} {time.time() - t0:.0f}s",
                flush=True,
            )
model.eval()
save_model(out, model, CFG)
print("saved", out, time.time() - t0)
