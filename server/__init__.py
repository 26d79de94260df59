"""dashscope-emo-mcp: an MCP server for DashScope portrait animation (EMO and Emoji)."""
