"""The tunnel server, ``wstunnel srv`` ("wstunsrv")."""

from wstunnel.server.app import TunnelServer

__all__ = ["TunnelServer"]
