"""Plane geometry for zones and the counting line: orientation, segment intersection, point in polygon."""

from __future__ import annotations

from collections.abc import Sequence

Point = tuple[float, float]


def orient(a: Point, b: Point, c: Point) -> float:
    """Twice the signed area of a, b, c: > 0 one way round, < 0 the other, 0 when collinear."""
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def segments_meet(p1: Point, p2: Point, q1: Point, q2: Point) -> bool:
    """True when the closed segments p1-p2 and q1-q2 share a point."""
    d1, d2, d3, d4 = orient(q1, q2, p1), orient(q1, q2, p2), orient(p1, p2, q1), orient(p1, p2, q2)
    if d1 * d2 < 0 and d3 * d4 < 0:
        return True

    def on(a: Point, b: Point, c: Point) -> bool:  # c on segment a-b, given collinear
        return min(a[0], b[0]) <= c[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= c[1] <= max(a[1], b[1])

    return ((d1 == 0 and on(q1, q2, p1)) or (d2 == 0 and on(q1, q2, p2)) or (d3 == 0 and on(p1, p2, q1))
            or (d4 == 0 and on(p1, p2, q2)))


def inside(polygon: Sequence[Point], x: float, y: float) -> bool:
    """Whether (x, y) is inside the simple ``polygon`` (even-odd ray casting; points on an edge may go either way)."""
    result = False
    n = len(polygon)
    x0, y0 = polygon[n - 1]
    for x1, y1 in polygon:
        if (y1 > y) != (y0 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            result = not result
        x0, y0 = x1, y1
    return result
