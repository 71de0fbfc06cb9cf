"""The tunnel client, ``wstunnel cli`` ("wstuncli"): ``wstunnel.client.agent.TunnelClient``."""
