"""Checked by mypy (the `typecheck` session), not run: every adapter satisfies the ports it claims.

Assigning an instance to a variable typed with a Protocol makes mypy prove,
structurally, that the adapter has every method with compatible signatures;
adapters inherit nothing from volley-core, so this is where a drift shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from volley.codecs import DataclassModelHandler, JsonSerializer, PassThroughModelHandler, RawSerializer
    from volley.memory import MemoryBrowser, MemoryConnector, MemoryConsumer, MemoryProducer
    from volley.observe import MultiObserver
    from volley.ports import (
        BrowsableConnector,
        Connector,
        Consumer,
        DeadLetterObserver,
        DepthReporter,
        Drainable,
        Instrumented,
        LagReporter,
        MessageTrace,
        ModelHandler,
        Observer,
        Pausable,
        Producer,
        PurgeableBefore,
        QueueBrowser,
        ReadinessReporter,
        RebalanceAware,
        RunTracer,
        Serializer,
        SettlingBrowser,
        Tracer,
        Transactional,
    )
    from volley_kafka.connector import KafkaConnector
    from volley_kafka.consumer import KafkaConsumer
    from volley_kafka.dlq import KafkaBrowser
    from volley_kafka.producer import KafkaProducer
    from volley_kafka.transactional import TransactionalKafkaConsumer
    from volley_otel.tracer import ContextRunTracer, OtelRunTracer, OtelTrace, OtelTracer
    from volley_prometheus.observer import PrometheusObserver
    from volley_rsmq.browse import RsmqBrowser
    from volley_rsmq.connector import RsmqConnector
    from volley_rsmq.consumer import RsmqConsumer
    from volley_rsmq.producer import RsmqProducer
    from volley_serializers.msgpack_serializer import MsgpackSerializer
    from volley_serializers.orjson_serializer import OrjsonSerializer
    from volley_serializers.pydantic_handlers import (
        PydanticListModelHandler,
        PydanticModelHandler,
        PydanticParserModelHandler,
    )
    from volley_sqlite.browse import SqliteBrowser
    from volley_sqlite.connector import SqliteConnector, SqliteConsumer, SqliteProducer

    def connectors(memory: MemoryConnector, kafka: KafkaConnector, rsmq: RsmqConnector) -> list[Connector]:
        return [memory, kafka, rsmq]

    def consumers(memory: MemoryConsumer, kafka: KafkaConsumer, rsmq: RsmqConsumer) -> list[Consumer]:
        return [memory, kafka, rsmq]

    def producers(memory: MemoryProducer, kafka: KafkaProducer, rsmq: RsmqProducer) -> list[Producer]:
        return [memory, kafka, rsmq]

    def kafka_capabilities(
        kafka: KafkaConsumer, eos: TransactionalKafkaConsumer
    ) -> tuple[Pausable, RebalanceAware, LagReporter, Instrumented, ReadinessReporter, Consumer, Transactional]:
        return kafka, kafka, kafka, kafka, kafka, eos, eos

    def drainables(memory: MemoryConsumer, kafka: KafkaConsumer, rsmq: RsmqConsumer) -> list[Drainable]:
        return [memory, kafka, rsmq]

    def serializers(json: JsonSerializer, raw: RawSerializer, orjson: OrjsonSerializer,
                    msgpack: MsgpackSerializer) -> list[Serializer]:
        return [json, raw, orjson, msgpack]

    def model_handlers(dataclass: DataclassModelHandler, none: PassThroughModelHandler, pydantic: PydanticModelHandler,
                       parser: PydanticParserModelHandler, many: PydanticListModelHandler) -> list[ModelHandler]:
        return [dataclass, none, pydantic, parser, many]

    from volley.ports import DeclaresDumpMode, FusedEncodeBinder, UncheckedDeserializer, UncheckedSerializer

    def codec_abilities(
        orjson: OrjsonSerializer, msgpack: MsgpackSerializer, pydantic: PydanticModelHandler,
        parser: PydanticParserModelHandler, many: PydanticListModelHandler,
    ) -> tuple[list[UncheckedSerializer], list[UncheckedDeserializer], DeclaresDumpMode, list[FusedEncodeBinder]]:
        return [orjson, msgpack], [orjson, msgpack], msgpack, [pydantic, parser, many]

    def observers(prometheus: PrometheusObserver, multi: MultiObserver) -> list[Observer]:
        return [prometheus, multi]

    def sqlite_ports(
        connector: SqliteConnector, consumer: SqliteConsumer, producer: SqliteProducer
    ) -> tuple[Connector, Consumer, Producer, Drainable, DepthReporter]:
        return connector, consumer, producer, consumer, consumer

    def tracers(tracer: OtelTracer, run: OtelRunTracer, context_only: ContextRunTracer,
                trace: OtelTrace) -> tuple[Tracer, RunTracer, RunTracer, MessageTrace]:
        return tracer, run, context_only, trace

    def dead_letter_ports(
        memory: MemoryConnector, kafka: KafkaConnector, rsmq: RsmqConnector, sqlite: SqliteConnector,
        memory_browser: MemoryBrowser, kafka_browser: KafkaBrowser, rsmq_browser: RsmqBrowser,
        sqlite_browser: SqliteBrowser, prometheus: PrometheusObserver,
    ) -> tuple[list[BrowsableConnector], list[QueueBrowser], list[SettlingBrowser], PurgeableBefore,
               DeadLetterObserver]:
        return ([memory, kafka, rsmq, sqlite], [memory_browser, kafka_browser, rsmq_browser, sqlite_browser],
                [memory_browser, kafka_browser, rsmq_browser, sqlite_browser], kafka_browser, prometheus)

    from volley.ports import CheckedConnector, DeclaresDeliveryTerms
    from volley_kafka.share_connector import ShareConnector
    from volley_kafka.share_consumer import ShareKafkaConsumer

    def kafka_share_ports(
        connector: ShareConnector, consumer: ShareKafkaConsumer
    ) -> tuple[Connector, CheckedConnector, DeclaresDeliveryTerms, Consumer]:
        return connector, connector, connector, consumer
