"""The documentation's diagrams, drawn as SVG by plain Python at build time: no network, no external tool.

    python tools/docs/diagrams.py OUTDIR      # writes OUTDIR/diagrams/*.svg

The mkdocs hook (tools/docs/hooks.py) adds them to the site as generated files, so pages link them like any
image (``![...](diagrams/message-path.svg)``) and ``mkdocs build --strict`` checks those links.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from xml.sax.saxutils import escape

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
INK = "#263238"
MUTED = "#546e7a"
PAPER = "#ffffff"
MAIN = ("#e3f2fd", "#1565c0")  # fill, stroke: the path every message takes when all goes well
GOOD = ("#e8f5e9", "#2e7d32")
BAD = ("#ffebee", "#c62828")
BACK = ("#fff8e1", "#ef6c00")


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def bottom(self) -> float:
        return self.y + self.h


class Svg:
    """A tiny SVG writer: boxes, arrows along straight segments, text. Enough for two diagrams."""

    def __init__(self, width: float, height: float, title: str, description: str) -> None:
        self.width, self.height = width, height
        self.parts: list[str] = [
            f"<title>{escape(title)}</title>",
            f"<desc>{escape(description)}</desc>",
            f'<rect x="0" y="0" width="{width}" height="{height}" rx="10" fill="{PAPER}"/>',
        ]

    def text(self, x: float, y: float, content: str, *, size: float = 13, anchor: str = "middle",
             color: str = INK, weight: str = "normal", italic: bool = False) -> None:
        style = ' font-style="italic"' if italic else ""
        self.parts.append(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{color}" '
            f'font-weight="{weight}"{style}>{escape(content)}</text>'
        )

    def lines(self, x: float, y: float, rows: Iterable[str], *, size: float = 12, anchor: str = "middle",
              color: str = MUTED) -> None:
        for i, row in enumerate(rows):
            self.text(x, y + i * (size + 3), row, size=size, anchor=anchor, color=color)

    def box(self, box: Box, title: str, subtitle: Iterable[str] = (), *, colors: tuple[str, str] = MAIN) -> Box:
        fill, stroke = colors
        self.parts.append(
            f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.w:.1f}" height="{box.h:.1f}" rx="8" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="1.6"/>'
        )
        sub = list(subtitle)
        top = box.cy - (len(sub) * 14) / 2 + 4
        self.text(box.cx, top, title, size=14, weight="bold", color=stroke)
        self.lines(box.cx, top + 16, sub, size=11.5)
        return box

    def arrow(self, points: list[tuple[float, float]], *, color: str = INK, dashed: bool = False) -> None:
        path = " ".join(f"{'M' if i == 0 else 'L'} {x:.1f} {y:.1f}" for i, (x, y) in enumerate(points))
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        marker = {INK: "arrow-ink", BAD[1]: "arrow-bad", BACK[1]: "arrow-back", GOOD[1]: "arrow-good"}[color]
        self.parts.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.8"{dash} '
                          f'marker-end="url(#{marker})"/>')

    def curve(self, d: str, *, color: str) -> None:
        marker = {INK: "arrow-ink", BAD[1]: "arrow-bad", BACK[1]: "arrow-back", GOOD[1]: "arrow-good"}[color]
        self.parts.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="1.8" '
                          f'marker-end="url(#{marker})"/>')

    def raw(self, element: str) -> None:
        self.parts.append(element)

    def render(self) -> str:
        markers = "".join(
            f'<marker id="{name}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            f'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="{color}"/></marker>'
            for name, color in (("arrow-ink", INK), ("arrow-bad", BAD[1]), ("arrow-back", BACK[1]),
                                ("arrow-good", GOOD[1]))
        )
        body = "\n  ".join(self.parts)
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.width} {self.height}" '
            f'width="{self.width}" height="{self.height}" role="img" font-family="{FONT}">\n'
            f"  <defs>{markers}</defs>\n  {body}\n</svg>\n"
        )


def message_path_svg() -> str:
    """A message's path: consume, decode, handler, produce, confirmed, ack; and where failures branch off."""
    svg = Svg(1000, 372, "A message's path through Volley",
              "consume, decode and validate, handler, produce, outputs confirmed, ack; a handler that raises is "
              "retried after a backoff; undecodable or invalid input, and a handler whose retries are spent, go "
              "to the dead-letter queue, which is then acknowledged; a handler returning False, a failure "
              "without a dead-letter queue, or an output that fails for good is given back to the broker.")
    w, h, gap, top = 135, 64, 28, 92
    names = [
        ("consume", ["poll the input"]),
        ("decode", ["serializer +", "data model"]),
        ("handler", ["your function"]),
        ("produce", ["to the output", "queues"]),
        ("confirmed", ["by each output's", "broker"]),
        ("ack", ["commit / delete", "the input"]),
    ]
    boxes = []
    for i, (title, sub) in enumerate(names):
        colors = GOOD if title == "ack" else MAIN
        boxes.append(svg.box(Box(22 + i * (w + gap), top, w, h), title, sub, colors=colors))
    for a, b in pairwise(boxes):
        svg.arrow([(a.right + 2, a.cy), (b.x - 3, b.cy)])
    consume, decode, handler, produce, confirmed, ack = boxes

    # Retry: a loop over the handler.
    x0, x1, y = handler.x + 30, handler.right - 30, handler.y
    svg.curve(f"M {x1:.1f} {y - 2:.1f} C {x1 + 10:.1f} {y - 46:.1f}, {x0 - 10:.1f} {y - 46:.1f}, "
              f"{x0:.1f} {y - 4:.1f}", color=BACK[1])
    svg.text(x1 + 22, y - 26, "raises: retry after a backoff", size=12, anchor="start", color=BACK[1])
    svg.text(x1 + 22, y - 11, "(up to max_retries)", size=11.5, anchor="start", color=MUTED)

    # The two places a message ends up when it does not go through: the DLQ and back to the broker.
    row = 250
    dlq = svg.box(Box(decode.x + 10, row, 290, 62), "dead letter",
                  ["the input as received, the reason", "in volley-error-* headers"], colors=BAD)
    back = svg.box(Box(produce.x + 30, row, 290, 62), "give back",
                   ["not acknowledged: the broker", "delivers it again"], colors=BACK)

    svg.arrow([(decode.cx - 20, decode.bottom + 2), (decode.cx - 20, dlq.y - 3)], color=BAD[1])
    svg.lines(decode.cx - 26, decode.bottom + 38, ["cannot decode", "or validate"], anchor="end", color=BAD[1])
    svg.arrow([(handler.cx - 20, handler.bottom + 2), (handler.cx - 20, dlq.y - 3)], color=BAD[1])
    svg.lines(handler.cx - 26, handler.bottom + 38, ["raised,", "retries spent"], anchor="end", color=BAD[1])
    svg.arrow([(handler.right - 18, handler.bottom + 2), (back.x + 40, back.y - 3)], color=BACK[1])
    svg.lines(handler.right + 52, handler.bottom + 24, ["returned False, or", "failed with no DLQ"],
              anchor="start", color=BACK[1])
    svg.arrow([(confirmed.cx + 10, confirmed.bottom + 2), (confirmed.cx + 10, back.y - 3)], color=BACK[1])
    svg.lines(confirmed.cx + 16, confirmed.bottom + 38, ["an output failed", "for good"], anchor="start",
              color=BACK[1])

    # A dead letter, once its broker confirmed it, acknowledges the input.
    bottom = 352
    svg.arrow([(dlq.cx, dlq.bottom + 2), (dlq.cx, bottom), (ack.cx, bottom), (ack.cx, ack.bottom + 3)],
              color=GOOD[1])
    svg.text((dlq.cx + ack.cx) / 2, bottom - 8, "once the dead-letter queue confirmed it", size=12,
             color=GOOD[1])
    svg.text(consume.x, 28, "Every input ends acknowledged, dead-lettered (then acknowledged), or given back.",
             size=13, anchor="start", color=INK, weight="bold")
    return svg.render()


def kafka_commit_svg() -> str:
    """The Kafka commit rule: only the unbroken run of finished offsets, from the last commit, is committed."""
    finished = [True, True, True, False, True, True, False, True, False, False]
    first = 40
    svg = Svg(1000, 300, "Which Kafka offset Volley commits",
              "Offsets 40 to 49 of one partition; 40, 41, 42 are finished, 43 is still in flight, 44, 45 and 47 "
              "are finished, 46, 48 and 49 are not. Volley commits 43: the first offset not yet finished. "
              "44, 45 and 47 wait until 43 finishes; after a crash everything from 43 on is read again.")
    size, gap, left, top = 72, 14, 70, 104
    cells = []
    for i, done in enumerate(finished):
        in_flight = i in (3, 6)
        colors = GOOD if done else (MAIN if in_flight else ("#eceff1", "#78909c"))
        box = Box(left + i * (size + gap), top, size, size)
        fill, stroke = colors
        svg.raw(f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{size}" height="{size}" rx="8" fill="{fill}" '
                f'stroke="{stroke}" stroke-width="1.6"/>')
        svg.text(box.cx, box.cy - 2, str(first + i), size=20, weight="bold", color=stroke)
        svg.text(box.cx, box.cy + 20, "finished" if done else ("in flight" if in_flight else "queued"),
                 size=11.5, color=MUTED)
        cells.append(box)

    # The unbroken run of finished offsets, and the committed position just past it.
    run_end = cells[2].right
    svg.raw(f'<rect x="{cells[0].x - 6:.1f}" y="{top - 8:.1f}" width="{run_end - cells[0].x + 12:.1f}" '
            f'height="{size + 16}" rx="12" fill="none" stroke="{GOOD[1]}" stroke-width="2" '
            f'stroke-dasharray="7 4"/>')
    svg.text(cells[0].x - 6, top - 18, "unbroken run of finished", size=14, anchor="start", color=GOOD[1],
             weight="bold")
    commit_x = (cells[2].right + cells[3].x) / 2
    svg.raw(f'<line x1="{commit_x:.1f}" y1="{top - 34:.1f}" x2="{commit_x:.1f}" y2="{top + size + 40:.1f}" '
            f'stroke="{INK}" stroke-width="2.5"/>')
    svg.text(commit_x, top - 44, "committed: 43", size=17, weight="bold")
    svg.text(commit_x, top - 66, "the next offset to read after a restart", size=14, color=MUTED)

    # Finished after the gap: they wait.
    wait = [c for c, done in zip(cells, finished, strict=True) if done][3:]
    for cell in wait:
        svg.arrow([(cell.cx, cell.bottom + 30), (cell.cx, cell.bottom + 5)], color=BACK[1])
    svg.text((wait[0].x + wait[-1].right) / 2, top + size + 48, "finished, but behind 43: not committed yet",
             size=14, color=BACK[1])
    svg.lines(left, top + size + 84,
              ["When 43 finishes, the commit moves to 46.",
               "After a crash, the group reads again from 43: 44, 45 and 47 are handled twice."],
              size=15, anchor="start", color=INK)
    return svg.render()


DIAGRAMS: dict[str, Callable[[], str]] = {
    "diagrams/message-path.svg": message_path_svg,
    "diagrams/kafka-commit.svg": kafka_commit_svg,
}


def write_all(outdir: Path) -> list[Path]:
    written = []
    for name, draw in DIAGRAMS.items():
        path = outdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(draw(), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(written_path)
