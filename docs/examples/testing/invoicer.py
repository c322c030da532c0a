"""The app under test: orders in, invoices out, on Kafka in production."""

from pydantic import BaseModel

from volley import Engine, MessageContext


class Order(BaseModel):
    order_id: int
    amount: float


class Invoice(BaseModel):
    order_id: int
    cents: int


app = Engine(
    app_name="invoicer",
    input_queue="orders",
    output_queues=["invoices"],
    dead_letter_queue="dead-letters",
    queue_config={
        "orders": {
            "value": "shop.orders",
            "profile": "confluent",
            "data_model": Order,
            "config": {
                "bootstrap.servers": "${KAFKA_BROKERS:-localhost:9092}",
                "group.id": "invoicer",
            },
        },
        "invoices": {
            "value": "shop.invoices",
            "profile": "confluent",
            "data_model": Invoice,
        },
        "dead-letters": {"value": "shop.orders.dlq", "profile": "confluent-dlq"},
    },
    metrics_port=None,
)


@app.stream_app
def invoice(
    order: Order, msg_ctx: MessageContext
) -> bool | list[tuple[str, Invoice, dict]]:
    if order.amount < 0:
        raise ValueError(f"negative amount {order.amount}")
    if order.amount == 0:
        return True  # nothing to invoice
    headers = {"trace-id": msg_ctx.headers.get("trace-id", b"")}
    return [
        (
            "invoices",
            Invoice(order_id=order.order_id, cents=round(order.amount * 100)),
            {"key": str(order.order_id), "headers": headers},
        )
    ]
