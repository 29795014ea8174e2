"""Training batches made where the model trains: the whole cache resident on the device, augmentation there too.

A GPU trains this small net on thousands of images a second; worker processes
that place images on canvases with numpy cannot feed it, and neither can the
PCIe copies of those canvases. Here the cached images sit on the device once, as
one padded uint8 stack (the packed caches of a 10k-image set are a few hundred MB
decoded), and every batch is a handful of vectorised tensor ops:

1. each sample is one image, or with probability ``mosaic`` a 2x2 mosaic of four
   around a random centre, on a virtual 448x448 grey canvas (the geometry of
   :class:`train.augment.BatchMaker`: same quadrants, same content box, same
   scale, translate and flip ranges, same box rules);
2. with probability ``copy_paste`` an image gets one or two person cut-outs
   pasted in (scaled to 0.25-0.8 of its height, maybe mirrored), and a labelled
   object the paste mostly hides is no longer asked for;
3. every output pixel is sampled bilinearly from that canvas (the canvas is
   never built: a pixel's value is looked up in the image or cut-out under it),
   then brightness, contrast and noise, then rounded to the uint8 grid the Pi feeds.

It makes the same kind of batches as :class:`train.augment.BatchMaker`, not
the same random draws: runs on either path are comparable, not identical.
Without augmentation an image lands exactly where the runtime letterbox puts it.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from train.augment import CANVAS, AugmentConfig
from train.batches import epoch_batches

GREY = 128.0
MAX_PASTES = 2  # cut-outs per image, as BatchMaker pastes (1 or 2)
HIDDEN = 0.6  # an object this much covered by a pasted person is dropped (BatchMaker's rule)


class DeviceCache:
    """A :class:`train.data.Cache` as padded tensors on ``device``."""

    def __init__(self, cache, device):
        dev = torch.device(device)
        n = len(cache)
        if n == 0:
            raise ValueError("DeviceCache needs at least one image")
        self.device, self.n = dev, n
        side = max(max(im.shape) for im in cache.images)
        stack = np.full((n, side, side), int(GREY), np.uint8)
        for i, im in enumerate(cache.images):
            stack[i, : im.shape[0], : im.shape[1]] = im
        self.side = side
        self.images = torch.from_numpy(stack).to(dev)
        self.hw = torch.tensor([im.shape for im in cache.images], dtype=torch.float32, device=dev)  # (n,2) h,w
        kmax = max(1, max(len(b) for b in cache.boxes))
        boxes = np.zeros((n, kmax, 4), np.float32)
        classes = np.zeros((n, kmax), np.int64)
        valid = np.zeros((n, kmax), bool)
        for i, (b, c) in enumerate(zip(cache.boxes, cache.classes, strict=True)):
            boxes[i, : len(b)] = b
            classes[i, : len(c)] = c
            valid[i, : len(b)] = True
        self.kmax = kmax
        self.boxes = torch.from_numpy(boxes).to(dev)
        self.classes = torch.from_numpy(classes).to(dev)
        self.valid = torch.from_numpy(valid).to(dev)
        self.n_cut = len(cache.cutouts)
        if self.n_cut:
            cside = max(max(p.shape) for p, _, _ in cache.cutouts)
            patches = np.zeros((self.n_cut, cside, cside), np.uint8)
            masks = np.zeros((self.n_cut, cside, cside), np.uint8)
            for k, (p, m, _) in enumerate(cache.cutouts):
                patches[k, : p.shape[0], : p.shape[1]] = p
                masks[k, : m.shape[0], : m.shape[1]] = m
            self.cut_side = cside
            self.cut_pixels = torch.from_numpy(patches).to(dev)
            self.cut_masks = torch.from_numpy(masks).to(dev)
            self.cut_hw = torch.tensor([p.shape for p, _, _ in cache.cutouts], dtype=torch.float32, device=dev)
            self.cut_class = torch.tensor([c for _, _, c in cache.cutouts], dtype=torch.int64, device=dev)
            # The cut-out's box is its mask's tight box; its fill says how much of that box the person covers.
            tight = []
            for _, m, _ in cache.cutouts:
                ys, xs = np.nonzero(m)
                tight.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, m.sum() / max(1, m.size)])
            self.cut_tight = torch.tensor(tight, dtype=torch.float32, device=dev)

    @property
    def nbytes(self) -> int:
        own = [self.images, self.boxes, self.classes, self.valid]
        if self.n_cut:
            own += [self.cut_pixels, self.cut_masks]
        return sum(t.numel() * t.element_size() for t in own)


class DeviceBatchMaker:
    """``make(indices) -> (x float32 (B,1,H,W) on the device, targets (M,6) b,cls,x1,y1,x2,y2 on the device)``."""

    def __init__(self, dcache: DeviceCache, cfg: AugmentConfig, width: int, height: int, seed: int = 0):
        self.c, self.cfg, self.w, self.h = dcache, cfg, width, height
        self.dev = dcache.device
        self.g = torch.Generator(device=self.dev).manual_seed(int(seed))

    def _rand(self, *shape):
        return torch.rand(shape, generator=self.g, device=self.dev)

    def _randint(self, high: int, *shape):
        return torch.randint(high, shape, generator=self.g, device=self.dev)

    # ---- layout: which image sits where on each sample's canvas
    def _layout(self, idx: torch.Tensor, augment: bool):
        """Per sample 4 slots: image index (B,4), top-left (B,4,2), active (B,4); the centre (B,2); content box (B,4)."""
        c, b = self.c, len(idx)
        mosaic = (self._rand(b) < self.cfg.mosaic) if augment else torch.zeros(b, dtype=torch.bool, device=self.dev)
        img = torch.cat([idx[:, None], self._randint(c.n, b, 3)], 1)
        hw = c.hw[img]  # (B,4,2)
        centre = (0.35 + 0.3 * self._rand(b, 2)) * CANVAS
        centre = centre.floor()  # BatchMaker's int(uniform * CANVAS)
        right = torch.tensor([0, 1, 0, 1], device=self.dev, dtype=torch.bool)
        below = torch.tensor([0, 0, 1, 1], device=self.dev, dtype=torch.bool)
        x0 = torch.where(right, centre[:, None, 0], centre[:, None, 0] - hw[..., 1])
        y0 = torch.where(below, centre[:, None, 1], centre[:, None, 1] - hw[..., 0])
        single = ~mosaic
        x0 = torch.where(single[:, None], torch.zeros_like(x0), x0)
        y0 = torch.where(single[:, None], torch.zeros_like(y0), y0)
        active = mosaic[:, None].expand(b, 4).clone()
        active[:, 0] = True
        # What is on the canvas of each slot, clipped to the canvas: the content box is their union.
        dx0, dy0 = x0.clamp(min=0), y0.clamp(min=0)
        dx1, dy1 = (x0 + hw[..., 1]).clamp(max=CANVAS), (y0 + hw[..., 0]).clamp(max=CANVAS)
        on = active & (dx1 > dx0) & (dy1 > dy0)
        big = torch.full_like(dx0, float(CANVAS))
        content = torch.stack(
            [
                torch.where(on, dx0, big).amin(1),
                torch.where(on, dy0, big).amin(1),
                torch.where(on, dx1, -big).amax(1),
                torch.where(on, dy1, -big).amax(1),
            ],
            1,
        )
        return img, torch.stack([x0, y0], -1), on, mosaic, centre, content

    # ---- copy-paste: up to MAX_PASTES cut-outs per slot, in that slot's image coordinates
    def _pastes(self, img: torch.Tensor, on: torch.Tensor, augment: bool):
        """(cut index (B,4,P), box x0,y0,w,h in image px (B,4,P,4), flipped (B,4,P), active (B,4,P))."""
        c, (b, s), p = self.c, img.shape, MAX_PASTES
        if not augment or not c.n_cut or self.cfg.copy_paste <= 0:
            return None
        hw = c.hw[img]  # (B,4,2)
        pasted = (self._rand(b, s) < self.cfg.copy_paste) & on
        count = 1 + (self._rand(b, s) < 0.5).long()  # one or two, as BatchMaker's integers(1, 3)
        cut = self._randint(c.n_cut, b, s, p)
        chw = c.cut_hw[cut]  # (B,4,P,2)
        ph = (0.25 + 0.55 * self._rand(b, s, p)) * hw[..., None, 0]
        scale = ph / chw[..., 0]
        nw, nh = (chw[..., 1] * scale).round().clamp(min=2), (chw[..., 0] * scale).round().clamp(min=2)
        fits = (nw < hw[..., None, 1]) & (nh < hw[..., None, 0])
        px = (self._rand(b, s, p) * (hw[..., None, 1] - nw + 1)).floor()
        py = (self._rand(b, s, p) * (hw[..., None, 0] - nh + 1)).floor()
        flip = self._rand(b, s, p) < 0.5
        slot = torch.arange(p, device=self.dev)
        act = pasted[..., None] & (slot < count[..., None]) & fits
        return cut, torch.stack([px, py, nw, nh], -1), flip, act

    # ---- the canvas value at integer canvas pixels (X, Y): image under it, then pastes over it
    def _canvas_at(self, X, Y, img, xy, on, mosaic, centre, pastes):
        """Grey levels (float, 128 outside everything) at canvas pixels X, Y of shape (B, N)."""
        c = self.c
        b = X.shape[0]
        q = torch.where(
            mosaic[:, None], (X >= centre[:, None, 0]).long() + 2 * (Y >= centre[:, None, 1]).long(),
            torch.zeros_like(X, dtype=torch.long),
        )
        bi = torch.arange(b, device=self.dev)[:, None].expand_as(X)
        ix = X - xy[bi, q, 0]
        iy = Y - xy[bi, q, 1]
        which = img[bi, q]
        h, w = c.hw[which, 0], c.hw[which, 1]
        inside = on[bi, q] & (ix >= 0) & (iy >= 0) & (ix < w) & (iy < h) & (X >= 0) & (Y >= 0)
        inside &= (X < CANVAS) & (Y < CANVAS)
        ixc, iyc = ix.clamp(0, c.side - 1).long(), iy.clamp(0, c.side - 1).long()
        val = c.images[which, iyc, ixc].float()
        if pastes is not None:
            cut, box, flip, act = pastes
            for k in range(MAX_PASTES):
                kk = cut[bi, q, k]
                bx = box[bi, q, k]  # (B,N,4) x0,y0,w,h
                u = ix - bx[..., 0]
                v = iy - bx[..., 1]
                hit = act[bi, q, k] & (u >= 0) & (v >= 0) & (u < bx[..., 2]) & (v < bx[..., 3])
                # Nearest sample of the cut-out (its mask is resized nearest, as BatchMaker's cv2 INTER_NEAREST).
                ch, cw = c.cut_hw[kk, 0], c.cut_hw[kk, 1]
                cu = ((u + 0.5) * cw / bx[..., 2]).floor().clamp(min=0)
                cu = torch.minimum(cu, cw - 1)
                cu = torch.where(flip[bi, q, k], cw - 1 - cu, cu)
                cv = torch.minimum(((v + 0.5) * ch / bx[..., 3]).floor().clamp(min=0), ch - 1)
                cu, cv = cu.clamp(0, c.cut_side - 1).long(), cv.clamp(0, c.cut_side - 1).long()
                m = hit & (c.cut_masks[kk, cv, cu] > 0)
                val = torch.where(m, c.cut_pixels[kk, cv, cu].float(), val)
        return torch.where(inside, val, torch.full_like(val, GREY))

    def _params(self, content, mosaic, augment: bool):
        """Per sample: source centre cx, cy; scale; x direction (BatchMaker.sources' rules)."""
        cfg, W, H = self.cfg, self.w, self.h
        b = content.shape[0]
        x0, y0, x1, y1 = content.unbind(1)
        rw, rh = x1 - x0, y1 - y0
        s = torch.minimum(W / rw, H / rh)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        fx = torch.ones(b, device=self.dev)
        if augment:
            wide = (rw > CANVAS // 2) | (rh > CANVAS // 2)
            lo = torch.where(wide, torch.full_like(s, max(cfg.scale_min, 0.8)), torch.full_like(s, cfg.scale_min))
            hi = torch.where(wide, torch.full_like(s, max(cfg.scale_max, 2.0)), torch.full_like(s, cfg.scale_max))
            s = s * torch.exp(torch.log(lo) + self._rand(b) * (torch.log(hi) - torch.log(lo)))
            cx = cx + (self._rand(b) * 2 - 1) * cfg.translate * rw
            cy = cy + (self._rand(b) * 2 - 1) * cfg.translate * rh
            fx = torch.where(self._rand(b) < cfg.flip, -fx, fx)
        else:
            nw, nh = (rw * s).round(), (rh * s).round()
            cx = x0 + (W / 2 - torch.div(W - nw, 2, rounding_mode="floor")) / s
            cy = y0 + (H / 2 - torch.div(H - nh, 2, rounding_mode="floor")) / s
        return cx, cy, s, fx

    def _targets(self, img, xy, on, pastes, cx, cy, s, fx):
        """(M,6) b, cls, x1, y1, x2, y2 in output pixels, after the same visibility rules as BatchMaker."""
        c, cfg, W, H = self.c, self.cfg, self.w, self.h
        b = img.shape[0]
        boxes = c.boxes[img]  # (B,4,K,4) image px
        cls = c.classes[img]
        valid = c.valid[img] & on[..., None]
        if pastes is not None:
            cut, pbox, flip, act = pastes
            tight = c.cut_tight[cut]  # (B,4,P,5) in cut-out px
            chw = c.cut_hw[cut]
            sx, sy = pbox[..., 2] / chw[..., 1], pbox[..., 3] / chw[..., 0]
            tx1 = torch.where(flip, chw[..., 1] - tight[..., 2], tight[..., 0])
            tx2 = torch.where(flip, chw[..., 1] - tight[..., 0], tight[..., 2])
            pb = torch.stack(
                [pbox[..., 0] + tx1 * sx, pbox[..., 1] + tight[..., 1] * sy, pbox[..., 0] + tx2 * sx,
                 pbox[..., 1] + tight[..., 3] * sy], -1
            )
            # An object a pasted person mostly hides is no longer asked for (coverage: overlap x the mask's fill).
            for k in range(MAX_PASTES):
                ix = (torch.minimum(boxes[..., 2], pb[:, :, None, k, 2]) - torch.maximum(boxes[..., 0], pb[:, :, None, k, 0])).clamp(min=0)
                iy = (torch.minimum(boxes[..., 3], pb[:, :, None, k, 3]) - torch.maximum(boxes[..., 1], pb[:, :, None, k, 1])).clamp(min=0)
                area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp(min=1e-6)
                cover = ix * iy / area * tight[:, :, None, k, 4]
                valid = valid & ~(act[:, :, None, k] & (cover >= HIDDEN))
            boxes = torch.cat([boxes, pb], 2)
            cls = torch.cat([cls, c.cut_class[cut]], 2)
            valid = torch.cat([valid, act], 2)
        canvas = boxes + torch.cat([xy, xy], -1)[:, :, None, :]  # (B,4,K',4) canvas px
        # A mosaic image can hang over the canvas edge: what hangs over is grey, not the object.
        hw = c.hw[img]
        region = torch.stack(
            [xy[..., 0].clamp(min=0), xy[..., 1].clamp(min=0), (xy[..., 0] + hw[..., 1]).clamp(max=CANVAS),
             (xy[..., 1] + hw[..., 0]).clamp(max=CANVAS)], -1
        )[:, :, None, :]
        lo = torch.maximum(canvas[..., :2], region[..., :2])
        seen = torch.cat([lo, torch.maximum(torch.minimum(canvas[..., 2:], region[..., 2:]), lo)], -1)  # empty if outside

        def warp(bx):
            xa = (bx[..., 0] - cx[:, None, None]) * s[:, None, None] * fx[:, None, None] + W / 2
            xb = (bx[..., 2] - cx[:, None, None]) * s[:, None, None] * fx[:, None, None] + W / 2
            y1 = (bx[..., 1] - cy[:, None, None]) * s[:, None, None] + H / 2
            y2 = (bx[..., 3] - cy[:, None, None]) * s[:, None, None] + H / 2
            return torch.minimum(xa, xb), y1, torch.maximum(xa, xb), y2

        x1, y1, x2, y2 = warp(canvas)
        area = (x2 - x1) * (y2 - y1)
        v1, w1, v2, w2 = warp(seen)
        c1, d1, c2, d2 = v1.clamp(0, W), w1.clamp(0, H), v2.clamp(0, W), w2.clamp(0, H)
        vis = (c2 - c1).clamp(min=0) * (d2 - d1).clamp(min=0)
        keep = valid & (vis >= cfg.min_visible * area.clamp(min=1e-9)) & (c2 - c1 >= cfg.min_side) & (d2 - d1 >= cfg.min_side)
        bidx = torch.arange(b, device=self.dev)[:, None, None].expand_as(keep)
        return torch.stack(
            [bidx[keep].float(), cls[keep].float(), c1[keep], d1[keep], c2[keep], d2[keep]], 1
        )

    def make(self, indices, augment: bool = True):
        cfg, W, H = self.cfg, self.w, self.h
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64, device=self.dev)
        b = len(idx)
        img, xy, on, mosaic, centre, content = self._layout(idx, augment)
        pastes = self._pastes(img, on, augment)
        cx, cy, s, fx = self._params(content, mosaic, augment)
        # grid_sample's bilinear, align_corners=False: output pixel centre -> canvas position - 0.5.
        u = torch.arange(W, dtype=torch.float32, device=self.dev) + 0.5 - W / 2
        v = torch.arange(H, dtype=torch.float32, device=self.dev) + 0.5 - H / 2
        sx = cx[:, None] + u[None] / s[:, None] * fx[:, None] - 0.5  # (B,W)
        sy = cy[:, None] + v[None] / s[:, None] - 0.5  # (B,H)
        px = sx[:, None, :].expand(b, H, W).reshape(b, -1)
        py = sy[:, :, None].expand(b, H, W).reshape(b, -1)
        x0, y0 = px.floor(), py.floor()
        wx, wy = px - x0, py - y0
        out = 0
        for dy, ky in ((0, 1 - wy), (1, wy)):
            for dx, kx in ((0, 1 - wx), (1, wx)):
                out = out + self._canvas_at(x0 + dx, y0 + dy, img, xy, on, mosaic, centre, pastes) * (kx * ky)
        out = (out - GREY).view(b, 1, H, W)
        if augment:
            contrast = 1 + (self._rand(b, 1, 1, 1) * 2 - 1) * cfg.contrast
            bright = (self._rand(b, 1, 1, 1) * 2 - 1) * cfg.brightness
            sigma = self._rand(b, 1, 1, 1) * cfg.noise
            noise = torch.randn(out.shape, generator=self.g, device=self.dev)
            out = out * contrast + bright + noise * sigma
        x = (out + GREY).round().clamp(0, 255)
        return x, self._targets(img, xy, on, pastes, cx, cy, s, fx)


class DeviceBatches:
    """The batch source for ``train.batches = "device"``: epochs of index batches (a Mix keeps its shares), made
    on the device. ``images_per_s`` is what the maker alone sustains (measured over the batches made so far)."""

    def __init__(self, cache, cfg: AugmentConfig, width: int, height: int, plan, batch: int, seed: int, device):
        self.maker = DeviceBatchMaker(DeviceCache(cache, device), cfg, width, height, seed)
        self.plan, self.batch, self.seed = plan, batch, seed
        self.epoch, self.queue = 0, []
        self.made, self.seconds = 0, 0.0

    def get(self):
        if not self.queue:
            self.queue = list(epoch_batches(self.plan, self.batch, self.seed, self.epoch))
            self.epoch += 1
        idx = self.queue.pop(0)
        t = time.perf_counter()
        x, tg = self.maker.make(idx)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        self.seconds += time.perf_counter() - t
        self.made += len(idx)
        return x, tg

    @property
    def images_per_s(self) -> float:
        return self.made / self.seconds if self.seconds > 0 else math.nan

    def close(self):
        self.queue = []
