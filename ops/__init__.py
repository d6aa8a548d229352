"""The operator's side: the admin CLI and the one-command lab.

Nothing here runs at a site: these tools talk to agents and brokers over their APIs only (the
brokers' HTTPS admin endpoints, the agents' control sockets) and import no daemon code.
"""
