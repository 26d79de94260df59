"""Hosting for many people (issue 15): the tenants file, who a request's token names, signed links to
videos, and the audit trail of paid calls. Beside the store and the upstream client: config and below."""
