"""meshboot: the contract shared by the injector (webhook), the init container (init) and the sidecar agent (agent)."""
