"""The tunnel server, ``wstunnel srv`` ("wstunsrv"): ``wstunnel.server.app.TunnelServer``."""
