"""Unit tests of the invoicer: no Kafka, the same codecs as in production."""

from invoicer import Invoice, Order, invoice

from volley.testing import harness


def test_an_order_becomes_an_invoice() -> None:
    h = harness(invoice)
    h.send(Order(order_id=1, amount=2.5), key="1", headers={"trace-id": "abc"})

    result = h.run()

    assert result.outputs("invoices") == [Invoice(order_id=1, cents=250)]
    record = result.raw("invoices")[0]
    assert record.key == b"1"
    assert record.headers == {"trace-id": b"abc"}
    assert result.report.acked == 1


def test_free_orders_are_acknowledged_without_output() -> None:
    h = harness(invoice)
    h.send(Order(order_id=2, amount=0))

    result = h.run()

    assert result.outputs("invoices") == []
    assert result.report.acked == 1


def test_bad_messages_go_to_the_dead_letter_queue() -> None:
    h = harness(invoice)
    h.send(b"not json", raw=True)
    h.send(b'{"order_id": "three", "amount": 1.0}', raw=True)  # JSON, but not an Order
    h.send(Order(order_id=4, amount=-1))  # the handler raises

    result = h.run()

    stages = [d.headers["volley-error-stage"] for d in result.dead_letters]
    assert stages == [b"deserialize", b"validate", b"handler"]
    # the original bytes
    assert result.dead_letters[2].value == b'{"order_id":4,"amount":-1.0}'
    # max_retries, without waiting: the harness sets no backoff
    assert result.report.retries == 3
