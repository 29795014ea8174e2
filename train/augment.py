"""Batched augmentation for small detectors: mosaic, copy-paste, scale/translate/flip, photometric jitter.

Images come from the RAM :class:`train.data.Cache` (grey uint8, long side ~224).
Cheap per-image work (placing images on a canvas, pasting person cut-outs) is
numpy (:meth:`BatchMaker.sources`, which data-loader worker processes can run);
the expensive resampling and jitter run once per batch as torch ops
(:meth:`BatchMaker.warp`: ``grid_sample`` on the whole batch, on the GPU when
there is one), so the CPU cores are not spent on Python loops. The geometry mirrors :func:`app.preprocess.letterbox`: an un-jittered
single image lands exactly where the runtime letterbox puts it, on grey 128.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

CANVAS = 448  # mosaic canvas: four cached images of long side <= 224


@dataclass(frozen=True)
class AugmentConfig:
    mosaic: float = 0.5  # probability a sample is a 2x2 mosaic
    copy_paste: float = 0.5  # probability to paste person cut-outs into an image
    flip: float = 0.5
    scale_min: float = 0.5  # zoom relative to the letterbox fit
    scale_max: float = 1.6
    translate: float = 0.25  # fraction of the content size
    brightness: float = 40.0  # +- grey levels
    contrast: float = 0.4  # factor in 1 +- contrast
    noise: float = 4.0  # max gaussian sigma, grey levels
    min_visible: float = 0.25  # drop a box when less of it than this stays in view
    min_side: float = 3.0  # drop a box smaller than this (input px)

    def __post_init__(self):
        for name in ("mosaic", "copy_paste", "flip", "min_visible"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"augment.{name} is a probability or fraction in [0, 1], got {v}")
        if not 0.0 < self.scale_min <= self.scale_max:
            raise ValueError(f"augment needs 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")
        for name in ("translate", "brightness", "contrast", "noise", "min_side"):
            v = getattr(self, name)
            if not (v >= 0.0 and math.isfinite(v)):
                raise ValueError(f"augment.{name} must be finite and >= 0, got {v}")


def no_augment() -> AugmentConfig:
    return AugmentConfig(0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)


class BatchMaker:
    """Makes training batches: ``x`` float32 (B,1,H,W) integer grey levels 0..255, ``targets`` (M,6) b,cls,x1,y1,x2,y2."""

    def __init__(self, cache, cfg: AugmentConfig, width: int, height: int, seed: int = 0):
        self.cache, self.cfg, self.w, self.h = cache, cfg, width, height
        self.rng = np.random.default_rng(seed)

    # ---- numpy: one sample's source canvas
    def _image(self, i: int):
        img = self.cache.images[i]
        boxes = self.cache.boxes[i].copy()
        cls = self.cache.classes[i].copy()
        if self.cache.cutouts and self.rng.random() < self.cfg.copy_paste:
            img, boxes, cls = self._paste(img.copy(), boxes, cls)
        return img, boxes, cls

    def _paste(self, img, boxes, cls):
        h, w = img.shape
        for _ in range(int(self.rng.integers(1, 3))):
            patch, mask, c = self.cache.cutouts[int(self.rng.integers(len(self.cache.cutouts)))]
            ph = self.rng.uniform(0.25, 0.8) * h
            s = ph / patch.shape[0]
            nw, nh = max(2, round(patch.shape[1] * s)), max(2, round(patch.shape[0] * s))
            if nw >= w or nh >= h:
                continue
            p = cv2.resize(patch, (nw, nh), interpolation=cv2.INTER_LINEAR)
            m = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST).astype(bool)
            if self.rng.random() < 0.5:
                p, m = p[:, ::-1], m[:, ::-1]
            x0, y0 = int(self.rng.integers(0, w - nw + 1)), int(self.rng.integers(0, h - nh + 1))
            full = np.zeros((h, w), bool)
            full[y0 : y0 + nh, x0 : x0 + nw] = m
            # An object the pasted person mostly hides is no longer visible: stop asking for it.
            keep = np.ones(len(boxes), bool)
            for k, (bx1, by1, bx2, by2) in enumerate(boxes):
                xa, ya, xb, yb = (
                    int(bx1),
                    int(by1),
                    max(int(bx1) + 1, int(math.ceil(bx2))),
                    max(int(by1) + 1, int(math.ceil(by2))),
                )
                keep[k] = full[ya:yb, xa:xb].mean() < 0.6
            boxes, cls = boxes[keep], cls[keep]
            region = img[y0 : y0 + nh, x0 : x0 + nw]
            region[m] = p[m]
            ys, xs = np.nonzero(m)
            box = np.array([[x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1]], np.float32)
            boxes = np.concatenate([boxes.reshape(-1, 4), box])
            cls = np.concatenate([cls, [c]]).astype(np.int64)
        return img, boxes, cls

    def _mosaic(self, first: int):
        canvas = np.full((CANVAS, CANVAS), 128, np.uint8)
        cx, cy = (int(self.rng.uniform(0.35, 0.65) * CANVAS) for _ in range(2))
        idx = [first] + [int(j) for j in self.rng.integers(len(self.cache), size=3)]
        all_boxes, all_cls = [], []
        x_lo, y_lo, x_hi, y_hi = CANVAS, CANVAS, 0, 0
        for q, i in enumerate(idx):
            img, boxes, cls = self._image(i)
            h, w = img.shape
            x0 = cx - w if q in (0, 2) else cx
            y0 = cy - h if q in (0, 1) else cy
            sx0, sy0 = max(0, -x0), max(0, -y0)
            dx0, dy0 = max(0, x0), max(0, y0)
            dx1, dy1 = min(CANVAS, x0 + w), min(CANVAS, y0 + h)
            if dx1 <= dx0 or dy1 <= dy0:
                continue
            canvas[dy0:dy1, dx0:dx1] = img[sy0 : sy0 + dy1 - dy0, sx0 : sx0 + dx1 - dx0]
            x_lo, y_lo, x_hi, y_hi = min(x_lo, dx0), min(y_lo, dy0), max(x_hi, dx1), max(y_hi, dy1)
            b = boxes + np.array([x0, y0, x0, y0], np.float32)
            all_boxes.append(b)
            all_cls.append(cls)
        boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4), np.float32)
        cls = np.concatenate(all_cls) if all_cls else np.zeros(0, np.int64)
        # Boxes are clipped (and dropped if mostly hidden) after the final warp.
        return canvas, boxes, cls, (x_lo, y_lo, x_hi, y_hi)

    def _source(self, i: int, augment: bool):
        if augment and self.rng.random() < self.cfg.mosaic:
            return self._mosaic(i)
        img, boxes, cls = (
            self._image(i) if augment else (self.cache.images[i], self.cache.boxes[i], self.cache.classes[i])
        )
        canvas = np.full((CANVAS, CANVAS), 128, np.uint8)
        h, w = img.shape
        canvas[:h, :w] = img
        return canvas, boxes, cls, (0, 0, w, h)

    # ---- numpy: the batch's canvases, warp parameters and targets (CPU; data-loader workers run this)
    def sources(self, indices, augment: bool = True):
        """``(canvases uint8 (B,1,C,C), params float64 (B,4) = cx, cy, scale, x direction, targets float32 (M,6))``."""
        cfg, rng, W, H = self.cfg, self.rng, self.w, self.h
        b = len(indices)
        canvases = np.empty((b, 1, CANVAS, CANVAS), np.uint8)
        params = np.zeros((b, 4), np.float64)  # source x, y at the output centre; scale; x direction
        targets = []
        for k, i in enumerate(indices):
            canvas, boxes, cls, (x0, y0, x1, y1) = self._source(int(i), augment)
            canvases[k, 0] = canvas
            rw, rh = x1 - x0, y1 - y0
            s = min(W / rw, H / rh)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            fx = 1.0
            if augment:
                # A mosaic already shrinks each image to about half: zoom it in rather than out.
                lo, hi = (
                    (max(cfg.scale_min, 0.8), max(cfg.scale_max, 2.0))
                    if rw > CANVAS // 2 or rh > CANVAS // 2
                    else (cfg.scale_min, cfg.scale_max)
                )
                s *= math.exp(rng.uniform(math.log(lo), math.log(hi)))
                cx += rng.uniform(-cfg.translate, cfg.translate) * rw
                cy += rng.uniform(-cfg.translate, cfg.translate) * rh
                fx = -1.0 if rng.random() < cfg.flip else 1.0
            else:
                # The runtime letterbox's integer placement: pad_x = (W - round(w*s)) // 2.
                nw, nh = round(rw * s), round(rh * s)
                cx = x0 + (W / 2 - (W - nw) // 2) / s
                cy = y0 + (H / 2 - (H - nh) // 2) / s
            params[k] = (cx, cy, s, fx)
            if len(boxes):
                t = _warp_boxes(np.asarray(boxes, np.float64), cx, cy, s, fx, W, H, cfg.min_visible, cfg.min_side)
                keep, bx = t
                if keep.any():
                    targets.append(np.column_stack([np.full(keep.sum(), k), np.asarray(cls)[keep], bx]))
        tg = np.concatenate(targets).astype(np.float32) if targets else np.zeros((0, 6), np.float32)
        return canvases, params, tg

    # ---- torch: resample and jitter the whole batch at once, on whatever device the canvases are
    def warp(self, canvases: torch.Tensor, params: torch.Tensor, augment: bool = True, seed: int | None = None):
        """Float32 (B,1,H,W) integer grey levels 0..255 from :meth:`sources`' canvases and params.

        ``seed`` drives the photometric jitter; None draws it from this maker's generator.
        """
        cfg, W, H = self.cfg, self.w, self.h
        dev = canvases.device
        b = canvases.shape[0]
        x = canvases.float() - 128.0  # u space: outside the canvas is grey 128
        p = params.to(dev, torch.float64)
        u = torch.arange(W, dtype=torch.float64, device=dev) + 0.5 - W / 2
        v = torch.arange(H, dtype=torch.float64, device=dev) + 0.5 - H / 2
        sx = p[:, 0, None] + u[None] / p[:, 2, None] * p[:, 3, None]  # (B,W) source edge coordinates
        sy = p[:, 1, None] + v[None] / p[:, 2, None]  # (B,H)
        grid = torch.stack(
            [(2 * sx / CANVAS - 1)[:, None, :].expand(b, H, W), (2 * sy / CANVAS - 1)[:, :, None].expand(b, H, W)], -1
        ).float()
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if augment:
            if seed is None:
                seed = int(self.rng.integers(1 << 62))
            g = torch.Generator(device=dev).manual_seed(seed)
            c = 1 + (torch.rand(b, 1, 1, 1, generator=g, device=dev) * 2 - 1) * cfg.contrast
            br = (torch.rand(b, 1, 1, 1, generator=g, device=dev) * 2 - 1) * cfg.brightness
            sigma = torch.rand(b, 1, 1, 1, generator=g, device=dev) * cfg.noise
            out = out * c + br + torch.randn(out.shape, generator=g, device=dev) * sigma
        # The Pi feeds uint8 pixels: train on the same integer grid.
        return (out + 128.0).round().clamp(0, 255)

    def make(self, indices, augment: bool = True):
        """``x`` float32 (B,1,H,W) and ``targets`` (M,6) b,cls,x1,y1,x2,y2, all on the CPU."""
        canvases, params, tg = self.sources(indices, augment)
        x = self.warp(torch.from_numpy(canvases), torch.from_numpy(params), augment)
        return x, torch.from_numpy(tg)


def _warp_boxes(boxes, cx, cy, s, fx, W, H, min_visible, min_side):
    x1 = (boxes[:, 0] - cx) * s * fx + W / 2
    x2 = (boxes[:, 2] - cx) * s * fx + W / 2
    x1, x2 = np.minimum(x1, x2), np.maximum(x1, x2)
    y1 = (boxes[:, 1] - cy) * s + H / 2
    y2 = (boxes[:, 3] - cy) * s + H / 2
    area = (x2 - x1) * (y2 - y1)
    cx1, cy1, cx2, cy2 = np.clip(x1, 0, W), np.clip(y1, 0, H), np.clip(x2, 0, W), np.clip(y2, 0, H)
    vis = (cx2 - cx1) * (cy2 - cy1)
    keep = (vis >= min_visible * np.maximum(area, 1e-9)) & (cx2 - cx1 >= min_side) & (cy2 - cy1 >= min_side)
    return keep, np.column_stack([cx1, cy1, cx2, cy2])[keep]
