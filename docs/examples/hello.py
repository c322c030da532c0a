"""Volley in twenty lines: one handler on the in-memory broker (volley-core alone)."""

from volley import Engine, MemoryBroker

broker = MemoryBroker()
memory = {"broker": broker}

app = Engine(
    app_name="doubler",
    input_queue="numbers",
    output_queues=["doubled"],
    queue_config={
        "numbers": {"value": "numbers", "profile": "memory", "config": memory},
        "doubled": {"value": "doubled", "profile": "memory", "config": memory},
    },
    metrics_port=None,
)


@app.stream_app
def double(message: dict) -> list[tuple[str, dict]]:
    return [("doubled", {"value": message["value"] * 2})]


if __name__ == "__main__":
    broker.publish("numbers", b'{"value": 21}')
    double.run_until_drained(timeout=10)
    print(broker.produced("doubled"))
