"""The values the contract produces, and the assertions over what a consumer received."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence

from volley.message import Envelope, OutgoingMessage

__all__ = ["assert_exactly_once", "assert_in_order", "group_by_partition", "index_of", "value_for"]


def value_for(index: int, tag: str = "msg") -> bytes:
    """The value the contract gives message ``index``: readable in failure output, and sortable."""
    return f"{tag}-{index:06d}".encode()


def index_of(message: Envelope | OutgoingMessage | bytes) -> int:
    """The index :func:`value_for` encoded in a value (or in an envelope's or record's value)."""
    value = message if isinstance(message, bytes) else message.value
    return int(value.rsplit(b"-", 1)[1])


def _short(values: Iterable[bytes], limit: int = 5) -> str:
    items = sorted(values)
    text = ", ".join(repr(v[:40]) for v in items[:limit])
    return f"[{text}{', ...' if len(items) > limit else ''}]"


def assert_exactly_once(
    received: Sequence[Envelope], expected: Iterable[bytes], *, optional: Iterable[bytes] = ()
) -> None:
    """Every expected value arrived exactly once and nothing else did (``optional`` values: at most once)."""
    expected_counts = Counter(expected)
    assert all(n == 1 for n in expected_counts.values()), "the test itself produced duplicate values"
    allowed = set(expected_counts) | set(optional)
    counts = Counter(e.value for e in received)
    missing = [v for v in expected_counts if counts[v] == 0]
    duplicated = [v for v, n in counts.items() if n > 1]
    unexpected = [v for v in counts if v not in allowed]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(expected_counts)} never arrived {_short(missing)}")
    if duplicated:
        problems.append(f"{len(duplicated)} arrived more than once {_short(duplicated)}")
    if unexpected:
        problems.append(f"{len(unexpected)} should not have arrived {_short(unexpected)}")
    assert not problems, "; ".join(problems) + f" (received {len(received)} envelopes)"


def assert_in_order(received: Sequence[Envelope], unit: Callable[[Envelope], Hashable | None]) -> None:
    """Within each ordering unit (``unit(envelope)``; None = unordered), indices strictly increase."""
    last: dict[Hashable, Envelope] = {}
    for envelope in received:
        group = unit(envelope)
        if group is None:
            continue
        before = last.get(group)
        assert before is None or index_of(before) < index_of(envelope), (
            f"order broken within {group!r}: {envelope.value!r} arrived after {before.value!r}"
        )
        last[group] = envelope


def group_by_partition(received: Sequence[Envelope]) -> dict[int | None, list[Envelope]]:
    groups: dict[int | None, list[Envelope]] = defaultdict(list)
    for envelope in received:
        groups[envelope.partition].append(envelope)
    return groups
