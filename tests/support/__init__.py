"""What the tests share: the process harness, stand-ins for peers, the original WStunnel as a
peer, fronts (proxies, TLS, nginx), network namespaces and the systemd container. Test modules
import from here, never from each other."""
