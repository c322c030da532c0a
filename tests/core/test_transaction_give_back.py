"""Exactly-once: an input given back (the handler returned False, or it failed with no DLQ and
on_failure="continue") aborts its transaction.

Its partition's committed offset cannot move past it, yet the inputs after it in the same transaction would
commit their outputs: an abort of a later transaction, or a restart, rewinds to the given-back input and those
outputs become visible a second time (tests/kafka/test_eos.py shows it on a broker). So the transaction holding
it aborts, and the give-back reaches the consumer first: the delivery counts, and the partition waits out the
redelivery delay before the rewind's inputs come again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from engine_fakes import Connector, Item, TxConsumer, make_engine, publish

from volley import MemoryBroker
from volley.message import Envelope


class Recording(TxConsumer):
    """Notes nacks (with their delay) in the same log as begin, commit and abort."""

    async def nack(self, envelopes: Sequence[Envelope], delay: float) -> None:
        self.log.append(("nack", [e.value for e in envelopes], delay))
        self.held = [e for e in self.held if e not in envelopes]
        await super().nack(envelopes, delay)


@pytest.mark.parametrize("how", ["returns False", "fails without a DLQ"])
def test_an_input_given_back_aborts_its_transaction_after_the_nack(how: str, caplog: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    publish(broker, 6)
    log: list[Any] = []
    seen: list[int] = []
    settings: dict[str, Any] = {"consume_batch_size": 6, "transaction_max_messages": 6,
                                "transaction_interval_seconds": 0.2, "redelivery_delay_seconds": 0.05}
    if how == "fails without a DLQ":
        settings.update(on_failure="continue", max_retries=0, dead_letter_queue=None)
    engine = make_engine(broker, Connector(broker, lambda b, q: Recording(b, q, log)), **settings)

    @engine.stream_app
    def handler(item: Item) -> Any:
        seen.append(item.n)
        if item.n == 2 and seen.count(2) == 1:
            if how == "returns False":
                return False
            raise ValueError("not now")
        return [("out", item)]

    report = handler.run_until_drained(timeout=5, drain_idle_seconds=0.3)
    events = [e if isinstance(e, str) else e[0] for e in log]
    assert "abort" in events, f"the transaction holding the given-back input aborts: {log}"
    assert events.index(next(e for e in events if e == "nack")) < events.index("abort"), \
        f"the nack reaches the consumer before the abort: {log}"
    assert "commit-start" not in events[:events.index("abort")], f"nothing committed before the abort: {log}"
    assert sorted(set(seen)) == list(range(6)) and seen.count(2) >= 2
    assert report.acked == 6, report
    # The give-back reached the consumer and aborted the transaction: counted as what it was, not as abandoned.
    assert (report.nacked, report.failed) == ((1, 0) if how == "returns False" else (0, 1)), report
    assert any("aborting the transaction: in[0]@2 was given back" in r.getMessage() for r in caplog.records)
