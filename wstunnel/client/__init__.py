"""The tunnel client, ``wstunnel cli`` ("wstuncli")."""

from wstunnel.client.agent import TunnelClient

__all__ = ["TunnelClient"]
