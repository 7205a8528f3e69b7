"""Grounding text formats of KEYE_SPEC: points, boxes, polygons, object refs, OCR and clip times."""

from __future__ import annotations

from collections.abc import Sequence

COORD_SCALE = 1000  # grounding coordinates are integers in [0, COORD_SCALE]


def normalize_coord(value: float, extent: float) -> int:
    """A pixel coordinate along a side of `extent` pixels as an integer in [0, 1000]."""
    if extent <= 0:
        raise ValueError(f"image extent {extent} must be positive to normalise coordinate {value}")
    return min(COORD_SCALE, max(0, round(value * COORD_SCALE / extent)))


def _xy(point: Sequence[float], size: tuple[int, int] | None) -> tuple[int, int]:
    if len(point) != 2:
        raise ValueError(f"a point needs 2 coordinates [x, y], got {list(point)}")
    if size is None:  # already normalised
        x, y = (int(v) for v in point)
        if not (0 <= x <= COORD_SCALE and 0 <= y <= COORD_SCALE):
            raise ValueError(f"normalised point {list(point)} is outside [0, {COORD_SCALE}]")
        return x, y
    width, height = size
    return normalize_coord(point[0], width), normalize_coord(point[1], height)


def _nested(values: Sequence, depth: int) -> list:
    """Accept one item or a list of items (e.g. one box or several boxes)."""
    probe = values
    for _ in range(depth):
        if not isinstance(probe, list | tuple) or not probe:
            raise ValueError(f"malformed grounding coordinates {values!r}")
        probe = probe[0]
    return list(values) if isinstance(probe, list | tuple) else [values]


def format_points(points: Sequence, *, size: tuple[int, int] | None) -> str:
    """`<|point_start|>[[x, y], ...]<|point_end|>`; size=(width, height) in pixels, None if normalised."""
    body = ", ".join("[{}, {}]".format(*_xy(p, size)) for p in _nested(points, 1))
    return f"<|point_start|>[{body}]<|point_end|>"


def format_boxes(boxes: Sequence, *, size: tuple[int, int] | None) -> str:
    """`<|box_start|>[[x1, y1, x2, y2], ...]<|box_end|>`."""
    parts = []
    for box in _nested(boxes, 1):
        if len(box) != 4:
            raise ValueError(f"a box needs 4 coordinates [x1, y1, x2, y2], got {list(box)}")
        (x1, y1), (x2, y2) = _xy(box[:2], size), _xy(box[2:], size)
        parts.append(f"[{x1}, {y1}, {x2}, {y2}]")
    return f"<|box_start|>[{', '.join(parts)}]<|box_end|>"


def _clockwise(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    # Image y grows downwards, so a clockwise polygon on screen has a positive shoelace sum.
    area2 = sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1]))
    return points if area2 >= 0 else [points[0], *reversed(points[1:])]


def format_polygons(polygons: Sequence, *, size: tuple[int, int] | None) -> str:
    """`<|polygon_start|>[[[x, y], ...], ...]<|polygon_end|>`, each polygon reordered to run clockwise."""
    parts = []
    for polygon in _nested(polygons, 2):
        if len(polygon) < 3:
            raise ValueError(f"a polygon needs at least 3 points, got {list(polygon)}")
        pts = _clockwise([_xy(p, size) for p in polygon])
        parts.append("[" + ", ".join(f"[{x}, {y}]" for x, y in pts) + "]")
    return f"<|polygon_start|>[{', '.join(parts)}]<|polygon_end|>"


def format_object_ref(text: str) -> str:
    return f"<|object_ref_start|>{text}<|object_ref_end|>"


def format_ocr(text: str) -> str:
    return f"<|ocr_text_start|>{text}<|ocr_text_end|>"


def format_clip_time(start: float, end: float) -> str:
    """`<|clip_time_start|>[t1, t2]<|clip_time_end|>` in seconds with one decimal, like frame timestamps."""
    if not 0 <= start <= end:
        raise ValueError(f"clip time [{start}, {end}] must satisfy 0 <= start <= end")
    return f"<|clip_time_start|>[{start:.1f}, {end:.1f}]<|clip_time_end|>"
