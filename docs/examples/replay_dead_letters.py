"""Replay dead letters: read them raw, drop Volley's error headers, send them back where they came from."""

from volley import Engine, MemoryBroker

broker = MemoryBroker()
memory = {"broker": broker}  # on Kafka: {"bootstrap.servers": ...}, profile "confluent-dlq"

replayer = Engine(
    app_name="replayer",
    input_queue="dead-letters",
    output_queues=["orders-raw"],
    queue_config={
        "dead-letters": {"value": "shop.orders.dlq", "profile": "memory-dlq", "config": memory},
        "orders-raw": {"value": "shop.orders", "profile": "memory-dlq", "config": memory},
    },
    metrics_port=None,
)


@replayer.stream_app
def replay(value: bytes, msg_ctx) -> bool | list[tuple[str, bytes, dict]]:
    if msg_ctx.headers.get("volley-error-stage") == b"deserialize":
        return True  # unreadable bytes will not become readable: leave them out
    headers = {name: v for name, v in msg_ctx.headers.items() if not name.startswith("volley-")}
    return [("orders-raw", value, {"key": msg_ctx.key, "headers": headers})]


if __name__ == "__main__":
    broker.publish("shop.orders.dlq", b'{"order_id": 7, "amount": -1}', b"7",
                   {"trace-id": b"abc", "volley-error-stage": b"handler"})
    broker.publish("shop.orders.dlq", b"garbage", None, {"volley-error-stage": b"deserialize"})
    print(replay.run_until_drained(timeout=10))
    print([(r.value, r.key, r.headers) for r in broker.produced_records("shop.orders")])
