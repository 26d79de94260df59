"""How MCP messages reach the server: stdio on asyncio pipes, and Streamable HTTP.

May import `server.app` (the application they serve) and everything below it; only the CLI
imports a transport.
"""
