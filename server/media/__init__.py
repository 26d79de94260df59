"""What the server may read and fetch for a caller: media sources, pre-flight checks, previews.

`sources.py` (URLs and local files confined to the allowed roots), `preflight.py` (free checks of
images and audio before a paid call), `preview.py` (bounded portrait reads for the viewer) and
`addresses.py` (loopback and the private-address guard). May import only `server.errors`.
"""
