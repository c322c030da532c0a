"""A gzip-compressed JSON serializer for Volley, registered as ``json-gzip``."""

from volley_jsongz.serializer import GzipJsonSerializer

__all__ = ["GzipJsonSerializer"]
