"""Typed errors of the wire. Each carries a short machine `reason` (a metrics label)."""


class WireError(Exception):
    """Base of every error raised while reading something that came over the wire."""

    reason = "invalid"


class FrameError(WireError):
    reason = "malformed_frame"


class BadMagic(FrameError):
    reason = "bad_magic"


class UnsupportedVersion(FrameError):
    reason = "wrong_version"


class TruncatedFrame(FrameError):
    reason = "truncated"


class OversizedFrame(FrameError):
    reason = "oversized"


class ChecksumMismatch(FrameError):
    reason = "bad_checksum"


class MalformedFrame(FrameError):
    reason = "malformed_frame"


class SchemaError(WireError):
    """The frame decoded but its header is not a valid message of the expected type."""

    reason = "bad_schema"


class TopicError(WireError):
    reason = "bad_topic"
