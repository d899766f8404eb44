"""umm node: processes, DHT, peer-to-peer transport, disk state and the `umm` CLI."""
