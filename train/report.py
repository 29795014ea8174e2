"""What a run reports: validation on the cached validation images, its curves, and a precision-recall plot.

Validation decodes the head with the runtime's own ``app.decode`` and scores it
with ``evaluation.metrics``, so its mAP is the one ``python -m evaluation``
would give for the same images at the cache's size.
"""

from __future__ import annotations

import numpy as np
import torch

from train.augment import BatchMaker, no_augment


@torch.no_grad()
def predict_cache(model, cache, width, height, anchors, batch=64):
    """Detections (in cached-image pixels) for every cached image, decoded by the runtime's app.decode."""
    from app.decode import decode
    from app.preprocess import Letterbox

    model.eval()
    maker = BatchMaker(cache, no_augment(), width, height)
    dets = []
    for start in range(0, len(cache), batch):
        idx = list(range(start, min(len(cache), start + batch)))
        canvases, params, _ = maker.sources(idx, augment=False)
        dev = next(model.parameters()).device
        x = maker.warp(torch.from_numpy(canvases).to(dev), torch.from_numpy(params), augment=False)
        head = model(x).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        for k, i in enumerate(idx):
            h, w = cache.images[i].shape
            s = min(width / w, height / h)
            lb = Letterbox(s, (width - round(w * s)) // 2, (height - round(h * s)) // 2)
            dets.append(decode(head[k], anchors, (width, height), lb, (h, w), score_threshold=0.005))
    return dets


def validate(model, cache, cfg, anchors, num_classes) -> dict:
    """COCO mAP of ``model`` on a cache (map50, map50_95, the PR curve), precision and recall at score 0.25."""
    from evaluation.metrics import coco_metrics, precision_recall

    m = cfg["model"]
    dets = predict_cache(model, cache, m.input_width, m.input_height, anchors)
    gts = list(zip(cache.boxes, cache.classes, strict=True))
    out = coco_metrics(gts, dets, num_classes, [im.shape for im in cache.images])
    out["precision"], out["recall"] = precision_recall(gts, dets, 0.25)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history, out_png):
    """Training loss (box, objectness, total) and validation mAP against the step."""
    plt = _pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history["train"]]
    for key in ("loss", "box", "obj"):
        vals = [h[key] for h in history["train"]]
        if key == "loss":
            k = max(1, len(vals) // 50)
            vals = np.convolve(vals, np.ones(k) / k, mode="same")
        ax[0].plot(steps, vals, label=key)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("step")
    ax[0].legend()
    ax[0].set_title("training loss")
    if history["val"]:
        vs = [h["step"] for h in history["val"]]
        ax[1].plot(vs, [h["map50"] for h in history["val"]], "o-", label="mAP@0.5")
        ax[1].plot(vs, [h["map50_95"] for h in history["val"]], "o-", label="mAP@0.5:0.95")
        ax[1].legend()
    ax[1].set_xlabel("step")
    ax[1].set_title("validation (cached val images)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def plot_pr(metrics: dict, out_png, title):
    """The precision-recall curve at IoU 0.5 of an evaluation."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(metrics["pr_recall"], metrics["pr_precision"])
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: AP@0.5 = {metrics['map50']:.3f}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
