"""The `dashscope-emo-mcp` command: serving (`main.py`) and the terminal commands.

`commands.py` (detect, generate, status, templates), `doctor.py`, `demo.py` and `terminal.py`
(tables and progress bars). The top layer: it may import anything, nothing imports it.
"""
