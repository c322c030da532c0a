"""A first Volley app on the in-memory broker: no servers, volley-core alone."""

from dataclasses import dataclass

from volley import Engine, MemoryBroker


@dataclass
class Order:
    order_id: int
    amount: float


@dataclass
class Invoice:
    order_id: int
    cents: int


broker = MemoryBroker()  # (1)!

app = Engine(
    app_name="invoicer",
    input_queue="orders",
    output_queues=["invoices"],
    dead_letter_queue="dead-letters",
    queue_config={
        "orders": {
            "value": "shop.orders",
            "profile": "memory",
            "data_model": Order,
            "config": {"broker": broker},
        },
        "invoices": {
            "value": "shop.invoices",
            "profile": "memory",
            "data_model": Invoice,
            "config": {"broker": broker},
        },
        "dead-letters": {
            "value": "shop.orders.dlq",
            "profile": "memory-dlq",
            "config": {"broker": broker},
        },
    },
    metrics_port=None,  # (2)!
)


@app.stream_app
def invoice(order: Order) -> list[tuple[str, Invoice]]:
    return [
        ("invoices", Invoice(order_id=order.order_id, cents=round(order.amount * 100)))
    ]


if __name__ == "__main__":
    broker.publish("shop.orders", b'{"order_id": 1, "amount": 2.5}')
    broker.publish("shop.orders", b'{"order_id": 2, "amount": 0.99}')
    broker.publish("shop.orders", b"this is not JSON")

    report = invoice.run_until_drained(timeout=10)  # (3)!

    print(report)
    print(broker.produced("shop.invoices"))
    print(broker.produced_records("shop.orders.dlq")[0].headers)
