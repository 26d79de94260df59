"""What the server may read and fetch for a caller: media sources, pre-flight checks, previews.

`sources.py` (URLs, and local files confined to the allowed roots, opened without following links
and read once), `preflight.py` (free checks of images and audio before a paid call), `preview.py`
(bounded portrait and video reads for the viewer) and `addresses.py` (loopback, the private-address
guard, and the pinned transport that connects only to vetted addresses). May import only
`server.errors`.
"""
