"""umm protocol: messages, signatures, codecs and verification rules (no sockets)."""
