"""The offline sandbox: a fake DashScope served on loopback, and the sample media it uses.

Used by `--sandbox`, the demo and the tests. Independent of the product: it imports only
`server.config` (the sandbox key), and only the CLI imports it.
"""
