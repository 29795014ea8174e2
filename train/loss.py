"""YOLOv5-form detection loss for the single-scale head, and k-means anchors.

The head's channel ``a*(5+C) + k`` is anchor a's value k (tx, ty, tw, th, obj,
cls...), as the runtime decodes it: cx = (gx + 2σ(tx) - 0.5)·stride,
w = aw·(2σ(tw))². A target is assigned to every anchor whose width/height
ratio to it is within ``anchor_t``, in its own cell and the two nearest
neighbour cells (the decode's -0.5..1.5 offset range reaches them).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def split_head(head: torch.Tensor, num_anchors: int):
    """(B, A*(5+C), gh, gw) → (B, A, gh, gw, 5+C)."""
    b, ch, gh, gw = head.shape
    return head.view(b, num_anchors, ch // num_anchors, gh, gw).permute(0, 1, 3, 4, 2)


def bbox_ciou(p: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of cx,cy,w,h boxes (N,4) pairwise."""
    p1, p2 = p[:, :2] - p[:, 2:] / 2, p[:, :2] + p[:, 2:] / 2
    t1, t2 = t[:, :2] - t[:, 2:] / 2, t[:, :2] + t[:, 2:] / 2
    inter = (torch.min(p2, t2) - torch.max(p1, t1)).clamp(min=0).prod(1)
    union = p[:, 2] * p[:, 3] + t[:, 2] * t[:, 3] - inter + eps
    iou = inter / union
    cw = torch.max(p2, t2) - torch.min(p1, t1)
    c2 = (cw**2).sum(1) + eps
    rho2 = ((p[:, :2] - t[:, :2]) ** 2).sum(1)
    v = (4 / math.pi**2) * (torch.atan(t[:, 2] / (t[:, 3] + eps)) - torch.atan(p[:, 2] / (p[:, 3] + eps))) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


class YoloLoss:
    def __init__(self, anchors, stride: int, num_classes: int, box=0.15, obj=1.0, cls=0.05, anchor_t=4.0):
        self.anchors = torch.as_tensor(np.asarray(anchors), dtype=torch.float32)  # (A,2) input px
        self.stride, self.nc = stride, num_classes
        self.w_box, self.w_obj, self.w_cls, self.anchor_t = box, obj, cls, anchor_t

    def __call__(self, head: torch.Tensor, targets: torch.Tensor):
        """targets (M,6): batch index, class, x1, y1, x2, y2 in input px. Returns (loss, parts dict)."""
        A = len(self.anchors)
        p = split_head(head, A)
        B, _, gh, gw, _ = p.shape
        dev = head.device
        tobj = torch.zeros(p.shape[:4], device=dev)
        lbox = torch.zeros((), device=dev)
        lcls = torch.zeros((), device=dev)
        bi, ai, gj, gi, tbox, tcls = self.build_targets(targets.to(dev), gh, gw)
        if len(bi):
            ps = p[bi, ai, gj, gi]
            anc = self.anchors.to(dev)[ai] / self.stride
            pxy = ps[:, :2].sigmoid() * 2 - 0.5
            pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anc
            ciou = bbox_ciou(torch.cat([pxy, pwh], 1), tbox)
            lbox = (1.0 - ciou).mean()
            # Where several targets land in one slot, keep the best IoU as the objectness target.
            iou = ciou.detach().clamp(0).to(tobj.dtype)
            order = torch.argsort(iou)
            tobj[bi[order], ai[order], gj[order], gi[order]] = iou[order]
            t = torch.zeros((len(bi), self.nc), device=dev)
            t[torch.arange(len(bi)), tcls] = 1.0
            lcls = F.binary_cross_entropy_with_logits(ps[:, 5:], t)
        lobj = F.binary_cross_entropy_with_logits(p[..., 4], tobj)
        loss = self.w_box * lbox + self.w_obj * lobj + self.w_cls * lcls
        return loss * B, {"box": float(lbox.detach()), "obj": float(lobj.detach()), "cls": float(lcls.detach())}

    def build_targets(self, targets, gh, gw):
        dev = targets.device
        len(self.anchors)
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        if not len(targets):
            return empty, empty, empty, empty, torch.zeros((0, 4), device=dev), empty
        s = self.stride
        xyxy = targets[:, 2:6]
        gxy = (xyxy[:, :2] + xyxy[:, 2:]) / 2 / s
        gwh = (xyxy[:, 2:] - xyxy[:, :2]) / s
        anc = self.anchors.to(dev) / s
        r = gwh[:, None, :] / anc[None]  # (M,A,2)
        ok = torch.max(r, 1 / r).max(2).values < self.anchor_t  # (M,A)
        m_idx, a_idx = ok.nonzero(as_tuple=True)
        g = gxy[m_idx]
        offsets = [torch.zeros(2, device=dev)]
        candidates = [(m_idx, a_idx, g.clone())]
        frac = g % 1.0
        gsize = torch.tensor([gw, gh], device=dev, dtype=g.dtype)
        # Neighbours whose cell the -0.5..1.5 offset range still reaches.
        for dim, d in ((0, -1), (1, -1), (0, 1), (1, 1)):
            if d < 0:
                sel = (frac[:, dim] < 0.5) & (g[:, dim] > 1.0)
            else:
                sel = (frac[:, dim] > 0.5) & (g[:, dim] < gsize[dim] - 1.0)
            off = torch.zeros(2, device=dev)
            off[dim] = d
            offsets.append(off)
            candidates.append((m_idx[sel], a_idx[sel], g[sel] + off))
        mi = torch.cat([c[0] for c in candidates])
        ai = torch.cat([c[1] for c in candidates])
        cell = torch.cat([c[2] for c in candidates]).floor().long()
        gi = cell[:, 0].clamp(0, gw - 1)
        gj = cell[:, 1].clamp(0, gh - 1)
        tb = torch.cat([gxy[mi] - torch.stack([gi, gj], 1).to(gxy.dtype), gwh[mi]], 1)
        return targets[mi, 0].long(), ai, gj, gi, tb, targets[mi, 1].long()


def kmeans_anchors(wh: np.ndarray, k: int, seed: int = 0, iters: int = 100) -> np.ndarray:
    """k-means with 1 - IoU distance on box sizes (N,2) → (k,2) float32 sorted by area."""
    wh = np.asarray(wh, np.float64)
    wh = wh[(wh > 2).all(1)]
    if len(wh) < k:
        raise ValueError(f"need at least {k} boxes to fit {k} anchors, got {len(wh)}")
    rng = np.random.default_rng(seed)
    centres = wh[rng.choice(len(wh), k, replace=False)]

    def iou(a, c):
        inter = np.minimum(a[:, None, 0], c[None, :, 0]) * np.minimum(a[:, None, 1], c[None, :, 1])
        return inter / (a[:, None].prod(2) + c[None].prod(2) - inter)

    for _ in range(iters):
        assign = iou(wh, centres).argmax(1)
        new = np.array([np.median(wh[assign == j], 0) if (assign == j).any() else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    return centres[np.argsort(centres.prod(1))].astype(np.float32)
