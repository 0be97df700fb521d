"""How `mora run` shows a session: a live view on a terminal, plain lines or JSON otherwise."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from mora_graphql.terminal.state import SessionState

STAGE_NAMES = {
    "FETCHING_SUBTITLES": "fetching subtitles",
    "GENERATING_CODE": "generating code",
    "BUILDING_TIMELINE": "building the timeline",
}


def describe(state: SessionState) -> str:
    if state.stage and not state.finished:
        return STAGE_NAMES.get(state.stage, state.stage.lower())
    return state.status.lower()


def error_line(state: SessionState) -> str:
    error = state.error or {}
    code = error.get("code", "UNKNOWN")
    numeric = error.get("numericCode")
    label = f"{code} ({numeric})" if numeric is not None else code
    return f"{label}: {error.get('message', 'the session failed')}"


def format_time(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class View:
    """The interface the command drives; the base class prints progress lines to `err`."""

    def __init__(self, out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._last_line = ""
        self._bucket = -1

    def __enter__(self) -> View:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop any live display (idempotent)."""

    def notice(self, text: str) -> None:
        self.err.write(f"mora: {text}\n")
        self.err.flush()

    def started(self, session_id: str, video_url: str | None) -> None:
        target = f" for {video_url}" if video_url else ""
        self.notice(f"following session {session_id}{target}")

    def event(self, event: dict[str, Any], state: SessionState) -> None:
        bucket = int(state.progress * 10)
        line = f"{describe(state)}"
        if line != self._last_line or bucket > self._bucket:
            self._last_line, self._bucket = line, bucket
            self.notice(f"[{state.progress:4.0%}] {line}")
        if event["__typename"] == "CodeReset":
            self.notice("the code stream restarted (the model call was retried)")

    def finished(self, state: SessionState) -> None:
        """Show the outcome; on COMPLETED the stored code alone goes to `out`, unchanged."""
        if state.status == "COMPLETED":
            self.out.write(state.code)
            self.out.flush()
            segments = len((state.timeline or {}).get("segments") or [])
            lines = len(state.code.splitlines())
            self.notice(
                f"completed session {state.session_id}: {lines} lines, {segments} timeline segments"
            )
        elif state.status == "ERROR":
            self.notice(f"session {state.session_id} failed: {error_line(state)}")
        else:
            self.notice(f"session {state.session_id} was {state.status.lower()}")


PlainView = View


class JsonView(View):
    """One JSON object per event on `out`, exactly as the server sent it."""

    def started(self, session_id: str, video_url: str | None) -> None:
        pass

    def event(self, event: dict[str, Any], state: SessionState) -> None:
        self.out.write(json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.out.flush()

    def finished(self, state: SessionState) -> None:
        if state.status == "ERROR":
            self.notice(f"session {state.session_id} failed: {error_line(state)}")


class LiveView(View):
    """A `rich` live display: stage and progress bar, the code as it is written
    (highlighted), the model's thoughts dimmed; the full code and the timeline at the end."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__()
        self.console = console or Console()
        self.state: SessionState | None = None
        self.session_id = ""
        self.video_url: str | None = None
        self.live = Live(
            get_renderable=self._render,
            console=self.console,
            refresh_per_second=8,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._running = False

    def close(self) -> None:
        if self._running:
            self._running = False
            self.live.stop()

    def notice(self, text: str) -> None:
        self.console.print(Text(f"mora: {text}", style="yellow"))

    def started(self, session_id: str, video_url: str | None) -> None:
        self.session_id, self.video_url = session_id, video_url
        self.live.start()
        self._running = True

    def event(self, event: dict[str, Any], state: SessionState) -> None:
        self.state = state
        if event["__typename"] == "CodeReset":
            self.notice("the code stream restarted (the model call was retried)")

    def _header(self, state: SessionState | None) -> RenderableType:
        title = Text()
        title.append("mora ", style="bold magenta")
        title.append((state.title if state and state.title else None) or self.video_url or "")
        title.append(f"  session {self.session_id}", style="dim")
        if state is None:
            return Group(title, Text("connecting...", style="dim"))
        bar = Table.grid(padding=(0, 1))
        bar.add_column(width=24)
        bar.add_column(ratio=1)
        bar.add_column(width=5, justify="right")
        bar.add_row(
            Text(describe(state), style="cyan"),
            ProgressBar(total=1.0, completed=state.progress),
            Text(f"{state.progress:.0%}"),
        )
        return Group(title, bar)

    def _render(self) -> RenderableType:
        state = self.state
        parts: list[RenderableType] = [self._header(state)]
        if state is not None:
            height = self.console.size.height
            thought_lines = state.thoughts.splitlines()[-3:] if state.thoughts else []
            room = max(3, height - 8 - len(thought_lines))
            if thought_lines:
                parts.append(Text("\n".join(thought_lines), style="dim italic"))
            lines = state.code.splitlines()
            shown = "\n".join(lines[-room:])
            first = max(1, len(lines) - room + 1)
            parts.append(
                Panel(
                    Syntax(
                        shown,
                        state.language,
                        line_numbers=True,
                        start_line=first,
                        theme="ansi_dark",
                    ),
                    title=f"{state.language} · {len(lines)} lines",
                    title_align="left",
                    border_style="blue",
                )
            )
        return Group(*parts)

    def finished(self, state: SessionState) -> None:
        self.close()
        console = self.console
        if state.code:
            console.print(
                Panel(
                    Syntax(state.code, state.language, line_numbers=True, theme="ansi_dark"),
                    title=f"{state.title or self.video_url or state.session_id}",
                    title_align="left",
                    border_style="green" if state.status == "COMPLETED" else "red",
                )
            )
        segments = (state.timeline or {}).get("segments") or []
        if segments:
            table = Table(title="Timeline", title_justify="left")
            table.add_column("Time", no_wrap=True)
            table.add_column("Lines", no_wrap=True, justify="right")
            table.add_column("Description")
            for segment in segments:
                span = f"{format_time(segment['startTime'])}-{format_time(segment['endTime'])}"
                table.add_row(span, segment.get("codeLines") or "-", segment["description"])
            console.print(table)
        if state.status == "COMPLETED":
            console.print(Text(f"Completed: session {state.session_id}", style="bold green"))
        elif state.status == "ERROR":
            console.print(Text(f"Failed: {error_line(state)}", style="bold red"))
        else:
            console.print(Text(f"Session {state.session_id} {state.status.lower()}", style="bold"))
