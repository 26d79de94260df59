"""`dashscope-emo-mcp install CLIENT`: write or merge this server's entry into a client's configuration.

The entry runs an absolute command (this environment's console script, or the absolute `uvx` with
`--from`), so a desktop app that does not see the shell's PATH still starts it. An existing file is
backed up before it changes and written atomically; an entry of the same name that runs something
else is left alone unless `--force`. The key comes from DASHSCOPE_API_KEY or a hidden prompt and is
never printed; VS Code asks for it itself (an `inputs` password), so it never lands in that file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from server.cli.clients import (
    KEY_VARIABLE,
    NEXT_STEP,
    TITLES,
    VSCODE_INPUT_ID,
    ClientId,
    Platform,
    config_path,
    server_entry,
    servers_key,
    vscode_key_input,
)
from server.errors import ConfigError, RefusedInputError

SCRIPT = "dashscope-emo-mcp"
DEFAULT_NAME = "dashscope-emo"
HIDDEN = "<hidden>"
PLAIN_TEXT = "stored in that file in plain text (the MCP Bundle keeps it in the OS keychain instead)"

Prompt = Callable[[str], str]


@dataclass(frozen=True)
class Request:
    """What to install, as the command line gave it."""

    client: ClientId
    name: str = DEFAULT_NAME
    output_dir: Path | None = None
    allowed_roots: tuple[Path, ...] = ()
    sandbox: bool = False
    uvx_from: str | None = None
    dry_run: bool = False
    force: bool = False


@dataclass(frozen=True)
class Outcome:
    client: ClientId
    path: Path
    change: str  # "added", "updated", "replaced", "unchanged"
    written: bool
    backup: Path | None
    entry: dict[str, Any]  # as written, the key masked
    key: str  # where the key comes from, in words
    notes: tuple[str, ...] = ()


def console_script() -> Path:
    """This environment's `dashscope-emo-mcp`, or a clear way out when there is none."""
    name = SCRIPT + (".exe" if os.name == "nt" else "")
    script = Path(sysconfig.get_path("scripts")) / name
    if not script.is_file():
        raise ConfigError(
            f"{script} does not exist, so there is no console script to point the client at. Install the package "
            "(`python -m pip install .`), or use uvx: add --uvx-from with a path, git URL or package name."
        )
    return script.absolute()


def _launch(request: Request, which: Callable[[str], str | None]) -> tuple[str, list[str]]:
    if request.uvx_from is None:
        return str(console_script()), []
    uvx = which("uvx")
    if uvx is None:
        raise ConfigError("--uvx-from needs uvx on PATH (it comes with uv: https://docs.astral.sh/uv/).")
    return str(Path(uvx).absolute()), ["--from", request.uvx_from, SCRIPT]


def _server_args(request: Request, output_dir: Path) -> list[str]:
    # Local files are read only inside the allowed folders; a desktop client's working folder means
    # nothing to the user, so the output folder is always one and the others are named explicitly.
    args = ["serve", "--allowed-root", str(output_dir), *(str(root) for root in request.allowed_roots)]
    return [*args, "--sandbox"] if request.sandbox else args


def _key(request: Request, env: dict[str, str], prompt: Prompt | None) -> tuple[str | None, str]:
    """The key to store (None: none) and where it came from, in words that never contain it."""
    if request.sandbox:
        return None, "none needed (sandbox)"
    if request.client == "vscode":
        return f"${{input:{VSCODE_INPUT_ID}}}", "VS Code asks for it once and keeps it in its secret storage"
    from_env = env.get(KEY_VARIABLE, "").strip()
    if from_env:
        return from_env, f"taken from {KEY_VARIABLE}; {PLAIN_TEXT}"
    if request.dry_run or prompt is None:
        return None, (
            f"not stored: set {KEY_VARIABLE} before installing (or answer the prompt in a terminal); "
            "without it the server reads ~/.alibabacloud/credentials"
        )
    typed = prompt("DashScope API key (Beijing region; not shown; Enter to skip): ").strip()
    if not typed:
        return None, "not stored (skipped): the server will read ~/.alibabacloud/credentials"
    return typed, f"typed at the prompt; {PLAIN_TEXT}"


def is_ours(entry: Any) -> bool:
    """An entry that launches this server (directly or through uvx) may be updated without --force."""
    if not isinstance(entry, dict):
        return False
    command = Path(str(entry.get("command", "")).replace("\\", "/")).name.removesuffix(".exe")
    args = entry.get("args")
    return command == SCRIPT or (isinstance(args, list) and SCRIPT in [str(arg) for arg in args])


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); nothing was changed.") from exc
    if not text.strip():
        return {}
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not plain JSON ({exc.msg}, line {exc.lineno}); nothing was changed. Fix it (comments are "
            "not supported here), or add the entry that `--dry-run` prints by hand."
        ) from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path} does not hold a JSON object; nothing was changed.")
    return document


def _existing_env(document: dict[str, Any], request: Request) -> dict[str, str]:
    """The environment of our existing entry of that name (empty for none, or for someone else's)."""
    servers = document.get(servers_key(request.client), {})
    existing = servers.get(request.name) if isinstance(servers, dict) else None
    if not isinstance(existing, dict) or not is_ours(existing) or not isinstance(existing.get("env"), dict):
        return {}
    return {str(k): str(v) for k, v in existing["env"].items()}


def _merge(document: dict[str, Any], request: Request, path: Path, entry: dict[str, Any]) -> tuple[dict[str, Any], str]:
    key = servers_key(request.client)
    servers = document.get(key, {})
    if not isinstance(servers, dict):
        raise ConfigError(f'{path}: "{key}" is not a JSON object; nothing was changed.')
    existing = servers.get(request.name)
    if existing == entry:
        change = "unchanged"
    elif existing is None:
        change = "added"
    elif is_ours(existing):
        change = "updated"
    elif request.force:
        change = "replaced"
    else:
        command = existing.get("command") if isinstance(existing, dict) else existing
        raise RefusedInputError(
            f'{path} already has a server named "{request.name}" that does not run {SCRIPT} '
            f"(command: {command!r}). Nothing was changed. Pick another name with --name, or replace it with --force."
        )
    merged = {**document, key: {**servers, request.name: entry}}
    if request.client == "vscode" and not request.sandbox:
        inputs = document.get("inputs", [])
        if not isinstance(inputs, list):
            raise ConfigError(f'{path}: "inputs" is not a JSON array; nothing was changed.')
        if not any(isinstance(item, dict) and item.get("id") == VSCODE_INPUT_ID for item in inputs):
            merged["inputs"] = [*inputs, vscode_key_input()]
            change = "updated" if change == "unchanged" else change
    return merged, change


def _write(path: Path, document: dict[str, Any], now: datetime) -> Path | None:
    """Back the old file up, then replace it atomically (a new file is private: it may hold the key)."""
    backup = None
    path = path.resolve() if path.is_symlink() else path  # a dotfile kept elsewhere stays a link
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        backup = path.with_name(f"{path.name}.bak-{now:%Y%m%d-%H%M%S}")
        counter = 1
        while backup.exists():
            backup = path.with_name(f"{path.name}.bak-{now:%Y%m%d-%H%M%S}-{counter}")
            counter += 1
        shutil.copy2(path, backup)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if backup is not None:
            shutil.copymode(backup, temporary)
        else:
            temporary.chmod(0o600)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return backup


def _masked(entry: dict[str, Any], key: str | None) -> dict[str, Any]:
    if key is None or key.startswith("${input:"):
        return entry
    return {**entry, "env": {**entry["env"], KEY_VARIABLE: HIDDEN}}


def install(
    request: Request,
    *,
    platform: Platform,
    prompt: Prompt | None = None,
    which: Callable[[str], str | None] = shutil.which,
    now: Callable[[], datetime] = datetime.now,
) -> Outcome:
    """Install (or with dry_run, only show) the entry; raises ConfigError/RefusedInputError, changing nothing."""
    path = config_path(request.client, platform)
    output_dir = (request.output_dir or platform.home / "dashscope-emo-output").expanduser().absolute()
    command, launch_args = _launch(request, which)
    args = [*launch_args, *_server_args(request, output_dir)]
    env = {"OUTPUT_DIR": str(output_dir)}
    document = _read(path)
    # A file or an entry we must not touch is reported before anyone is asked for a key.
    _merge(document, request, path, server_entry(request.client, command, args, env))
    key, key_words = _key(request, dict(platform.env), prompt)
    if key is not None:
        env = {KEY_VARIABLE: key, **env}
    else:
        # Installing again without a new key keeps the entry's own (and any variable the user added to it).
        kept = _existing_env(document, request)
        if kept.get(KEY_VARIABLE):
            key_words = "kept from the existing entry"
        env = {**kept, **env}
    entry = server_entry(request.client, command, args, env)
    merged, change = _merge(document, request, path, entry)
    notes = []
    if not path.parent.exists():
        notes.append(f"{path.parent} did not exist: is {TITLES[request.client]} installed for this user?")
    written = not request.dry_run and change != "unchanged"
    backup = _write(path, merged, now()) if written else None
    shown = _masked(entry, env.get(KEY_VARIABLE))
    return Outcome(request.client, path, change, written, backup, shown, key_words, tuple(notes))


def request_from(args: argparse.Namespace) -> Request:
    return Request(
        client=args.client,
        name=args.name,
        output_dir=Path(args.output_dir) if args.output_dir else None,
        allowed_roots=tuple(Path(root).expanduser().absolute() for root in args.allowed_root),
        sandbox=bool(args.sandbox),
        uvx_from=args.uvx_from,
        dry_run=args.dry_run,
        force=args.force,
    )


def show(outcome: Outcome, say: Callable[[str], None]) -> None:
    title = TITLES[outcome.client]
    verb = {"added": "added", "updated": "updated", "replaced": "replaced", "unchanged": "already up to date:"}
    if outcome.written:
        say(f"✓ {title}: {verb[outcome.change]} the server in {outcome.path}")
    elif outcome.change == "unchanged":
        say(f"✓ {title}: {verb['unchanged']} {outcome.path} (nothing written)")
    else:
        say(f"… {title}: would have {verb[outcome.change]} the server in {outcome.path} (dry run: nothing written)")
    if outcome.backup is not None:
        say(f"  backup of the previous file: {outcome.backup}")
    say(f"  command: {' '.join([outcome.entry['command'], *outcome.entry['args']])}")
    say(f"  key: {outcome.key}")
    for note in outcome.notes:
        say(f"  ! {note}")
    if outcome.written or outcome.change != "unchanged":
        say("  entry:")
        for line in json.dumps(outcome.entry, indent=2, ensure_ascii=False).splitlines():
            say("    " + line)
    if outcome.written:
        say(f"  next: {NEXT_STEP[outcome.client]}")
