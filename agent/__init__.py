"""meshboot's sidecar agent: pilot-agent's job (identity, SDS, XDS, Envoy bootstrap and supervision, status port)."""
__version__ = "0.1.0"
