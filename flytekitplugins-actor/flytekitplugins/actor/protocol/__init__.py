"""The replica lease protocol (``lease.proto``): the generated messages and the constants both ends share.

Both the agent's lease service and the replica worker import these from here, so the two ends of a stream
always agree on the version and on the message limits.
"""

#: Version of the lease protocol; a replica and an agent speak only when theirs are equal.
PROTOCOL_VERSION = 1

#: Outputs up to this size travel inline in TaskStatus; larger ones stay in the output prefix (outputs.pb, which
#: flytekit writes in any case), so no single stream message is large. Measured in docs/performance.md: inline
#: saves the agent a blob read per element, which matters for maps of many small elements.
INLINE_OUTPUT_BYTES = 256 * 1024

#: gRPC channel options of both ends of a lease stream.
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]
