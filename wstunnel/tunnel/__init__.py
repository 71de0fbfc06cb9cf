"""The trio side of the tunnel that both ends share: the transport contract and its two
transports (the WebSocket, HTTPS long-poll), the v2 endpoint that drives a V2Connection over
either, and what it is built from (the frame outbox, the per-stream chunk queue)."""
