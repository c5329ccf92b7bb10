"""The top runs' labels on a figure: "#rank" beside each point, placed so that close neighbours stay
legible, and the box that lists them."""

from __future__ import annotations

# Where a "#rank" label may go, in points from its point: beside it first, then further out.
LABEL_OFFSETS = [(dx, dy) for dy in (9, -9, 20, -20, 31, -31, 42, -42) for dx in (9, -27)]
LABEL_SIZE = (16, 10)  # a "#rank" label's box at fontsize 8, in points
LEADER = {"arrowstyle": "-", "color": "0.4", "linewidth": 0.5}  # a thin line from a label to its point
STAR_HALF = 7  # half a star marker (s=160) in points: labels keep off the stars too


def mark_ranks(ax, points: list[tuple[int, float, float]]) -> list[tuple[float, float, float, float]]:
    """ "#rank" beside each (rank, x, y), best first, each label at the first of LABEL_OFFSETS where its box
    overlaps no label placed before it and no top point: close neighbours stay legible. Call it once the
    axes' scales and limits are set. Returns the labels' boxes (x0, y0, x1, y1) in points."""
    ax.get_xlim(), ax.get_ylim()  # settle autoscaling before reading positions
    per_point = 72 / ax.figure.dpi
    where = [(rank, *map(float, ax.transData.transform((x, y)) * per_point), x, y) for rank, x, y in points]
    taken = [(px - STAR_HALF, py - STAR_HALF, px + STAR_HALF, py + STAR_HALF) for _, px, py, _, _ in where]
    boxes = []
    for rank, px, py, x, y in where:
        width, height = LABEL_SIZE
        candidates = [(px + dx, py + dy - height / 2, px + dx + width, py + dy + height / 2)
                      for dx, dy in LABEL_OFFSETS]  # fmt: skip
        box = next((box for box in candidates if not any(overlaps(box, other) for other in taken)),
                   candidates[-1])  # fmt: skip
        taken.append(box)
        boxes.append(box)
        offset = (box[0] - px, (box[1] + box[3]) / 2 - py)
        ax.annotate(f"#{rank}", (x, y), fontsize=8, fontweight="bold", xytext=offset, va="center",
                    textcoords="offset points", arrowprops=LEADER)  # fmt: skip
    return boxes


def overlaps(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def top_box(ax, lines: list[str], title: str) -> None:
    """The top runs, in full, in a box in the corner."""
    ax.text(0.99, 0.99, "\n".join([title, *lines]), transform=ax.transAxes, ha="right", va="top", fontsize=8,
            family="monospace", bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})  # fmt: skip
