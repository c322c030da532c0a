"""Quix Streams doing the Kafka benchmark's work; run by ``bench_peers.py`` in Quix's own venv.

Arguments: brokers, input topic, output topic, consumer group, message count, and a JSON object of options
(``processing_guarantee``, ``commit_interval`` in seconds, ``consumer_extra_config``, when given; Quix's defaults
otherwise). Prints one JSON line: the seconds from the first message handled to the run's end (its last
checkpoint committed).
"""

import json
import logging
import sys
import time
from importlib.metadata import version

from bench_kafka_model import work as do_work
from quixstreams import Application

brokers, source, output, group, count = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
options = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
app = Application(broker_address=brokers, consumer_group=group, auto_offset_reset="earliest", loglevel="WARNING",
                  use_changelog_topics=False, **options)
inputs = app.topic(source, key_deserializer="bytes", value_deserializer="bytes")
outputs = app.topic(output, key_serializer="bytes", value_serializer="bytes")
first: list[float] = []


def work(value: bytes) -> bytes:
    if not first:
        first.append(time.perf_counter())
    return do_work(value)


app.dataframe(inputs).apply(work).to_topic(outputs)
logging.getLogger("quixstreams").setLevel(logging.WARNING)
app.run(count=count, collect=False)
print(json.dumps({"elapsed": time.perf_counter() - first[0], "version": version("quixstreams")}), flush=True)
