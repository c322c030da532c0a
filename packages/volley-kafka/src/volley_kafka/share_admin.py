"""Setting a share group's own configuration: what its members cannot set (KIP-932 group configs).

``share.auto.offset.reset`` (``latest`` by default: a new group skips what the topic already holds),
``share.record.lock.duration.ms`` and ``share.delivery.count.limit`` belong to the group, on the broker; an
application (or a deployment step) sets them once with an admin call, before or after the group first exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported without __all__ in 2.16
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)


def configure_share_group(admin_config: Mapping[str, Any], group: str, *, auto_offset_reset: str | None = None,
                          record_lock_ms: int | None = None, delivery_count_limit: int | None = None,
                          timeout: float = 30.0) -> None:
    """Set the given group configs of share group ``group`` (None: leave as is); raise KafkaException on refusal.

    ``admin_config``: an AdminClient's settings (at least ``bootstrap.servers``, plus credentials).
    """
    wanted = {
        "share.auto.offset.reset": auto_offset_reset,
        "share.record.lock.duration.ms": record_lock_ms,
        "share.delivery.count.limit": delivery_count_limit,
    }
    entries = [ConfigEntry(name, str(value), incremental_operation=AlterConfigOpType.SET)
               for name, value in wanted.items() if value is not None]
    if not entries:
        return
    admin = AdminClient(dict(admin_config))
    resource = ConfigResource(ResourceType.GROUP, group, incremental_configs=entries)
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout)
