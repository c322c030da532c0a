"""The default data model of the ``*-pydantic`` profiles.

Importing this module needs Pydantic; profiles refer to it by its dotted path
("volley_serializers.models.GenericMessage") so that the import happens only
when a queue uses it.
"""

from __future__ import annotations

try:
    from pydantic import BaseModel, ConfigDict
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "volley_serializers.models needs Pydantic: pip install 'volley-serializers[pydantic]'"
    ) from exc


class GenericMessage(BaseModel):
    """Any JSON object: every field is accepted as an extra attribute, none is type-checked (as in py-volley).

    Read fields as attributes (``msg.order_id``) or all of them with
    ``msg.model_dump()``; construct one with ``GenericMessage(**fields)``.
    """

    model_config = ConfigDict(extra="allow")
