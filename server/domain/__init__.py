"""The business rules shared by the MCP tools and the CLI: detect, plan, pay, follow.

`service.py` is the one entry point (`Service`); it composes `detection.py` (detect calls and
their provenance record), `generation.py` (plans, dry runs, the budget and the submit),
`inputs.py` (media resolution, pre-flight, uploads and provenance checks), `uploads.py` (local
files to DashScope temporary storage), `provenance.py` and `budget.py`. May import the jobs,
the store, the upstream client, media and the base modules; never tools, transports or the CLI.
"""
