"""faust-streaming doing the Kafka benchmark's work; run by ``bench_peers.py`` in its venv.

Arguments: brokers, input topic, output topic, consumer group (the app's id), message count. An agent at its
defaults (aiokafka underneath): it sends each output and faust commits the offsets of acknowledged events
every ``broker_commit_every`` (10,000) events or ``broker_commit_interval`` (2.8 s). Prints a JSON line with the
wall-clock time of the first message handled; the bench watches outputs and the group's lag for the end, then
stops this process.
"""

import json
import logging
import os
import sys
import time

import faust
from bench_kafka_model import work as do_work

brokers, source, output, group = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
app = faust.App(group, broker=f"kafka://{brokers}", store="memory://", web_enabled=False,
                consumer_auto_offset_reset="earliest", topic_disable_leader=True)
inputs = app.topic(source, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
outputs = app.topic(output, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
first: list[float] = []


@app.agent(inputs)
async def work(stream: faust.StreamT) -> None:
    async for key, value in stream.items():
        if not first:
            first.append(time.time())
            # straight to the file descriptor: the quiet worker replaces sys.stdout
            os.write(1, json.dumps({"first": first[0], "version": faust.__version__}).encode() + b"\n")
        await outputs.send(key=key, value=do_work(value))


logging.disable(logging.WARNING)
faust.Worker(app, loglevel="ERROR", quiet=True, redirect_stdouts=False).execute_from_commandline()
