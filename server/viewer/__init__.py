"""The MCP Apps viewer: one self-contained HTML file (`viewer.html`) and its resources.

`extension.py` registers the `ui://` resource and the media reads it makes through the host.
May import the domain and everything below it; the tools and the app import it.
"""
