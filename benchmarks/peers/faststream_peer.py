"""FastStream (its confluent-kafka broker) doing the Kafka benchmark's work; run by ``bench_peers.py`` in its venv.

Arguments: brokers, input topic, output topic, consumer group, message count. At-least-once as FastStream
offers it: a subscriber with ``AckPolicy.ACK`` (the offset is committed after the handler returned; FastStream's
default, ``ACK_FIRST``, commits on receipt) whose handler awaits the publish of its output (confirmed by the
broker). One message at a time: FastStream's documented way to consume and publish. Prints one JSON line: the
seconds from the first message handled to the broker's close (its last commit) after the count-th.
"""

import asyncio
import json
import logging
import sys
import time
from importlib.metadata import version

from bench_kafka_model import work as do_work
from faststream import AckPolicy
from faststream.confluent import KafkaBroker
from faststream.confluent.annotations import KafkaMessage

brokers, source, output, group, count = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])


async def main() -> None:
    broker = KafkaBroker(brokers, logger=None)
    publisher = broker.publisher(output)
    first: list[float] = []
    done = asyncio.Event()
    handled = 0

    @broker.subscriber(source, group_id=group, auto_offset_reset="earliest", ack_policy=AckPolicy.ACK)
    async def work(message: KafkaMessage) -> None:
        nonlocal handled
        if not first:
            first.append(time.perf_counter())
        body = do_work(message.body)
        await publisher.publish(body, key=message.raw_message.key())
        handled += 1
        if handled >= count:
            done.set()

    await broker.start()
    await done.wait()
    await asyncio.sleep(0.5)  # the last message's ack, which runs after the handler returned
    await broker.stop()
    print(json.dumps({"elapsed": time.perf_counter() - first[0], "version": version("faststream")}), flush=True)


logging.disable(logging.WARNING)
asyncio.run(main())
