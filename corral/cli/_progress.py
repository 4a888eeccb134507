"""How ``corral template build`` and ``import`` show a build while it runs, on stderr.

Step headers as ``Step 3/7 (line 4) RUN make`` (``CACHED`` when a step was reused), each
step's output dimmed below it, and a progress bar per layer while an image is fetched. Kept out
of main.py because it holds state between events (an open line, the bars).
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from corral.sdk.models import BuildEvent

__all__ = ["BuildView", "step_header"]


def step_header(event: BuildEvent) -> Text:
    """``Step 3/7 (line 4) RUN make``, with ``CACHED`` after a reused step."""
    text = Text()
    if event.step is not None:
        of = f"/{event.of}" if event.of is not None else ""
        text.append(f"Step {event.step}{of}", style="bold")
    if event.line is not None:
        text.append(f" (line {event.line})", style="dim")
    # A continued instruction arrives with its newlines; a header stays one line.
    instruction = " ".join((event.instruction or "").split())
    if instruction:
        text.append(" " + instruction if len(text) else instruction, style="bold")
    if event.cached:
        text.append("  CACHED", style="green")
    return text


class BuildView:
    """Called with each ``BuildEvent``; remembers how long the build said it took."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.seconds: float | None = None
        self._mid_line = False  # the last output did not end its line
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, event: BuildEvent) -> None:
        if event.type == "step":
            self._end_line()
            self.console.print(step_header(event), soft_wrap=True)
        elif event.type == "output" and event.data:
            self.console.print(Text(event.data, style="dim"), end="", soft_wrap=True)
            self._mid_line = not event.data.endswith("\n")
        elif event.type == "progress" and event.layer:
            self._advance(event)
        elif event.type in ("done", "error"):
            self.seconds = event.seconds
            self.close()

    def _end_line(self) -> None:
        if self._mid_line:
            self.console.print(soft_wrap=True)
            self._mid_line = False

    def _advance(self, event: BuildEvent) -> None:
        assert event.layer is not None
        if self._progress is None:
            self._end_line()
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=self.console,
            )
            self._progress.start()
        task = self._tasks.get(event.layer)
        if task is None:
            digest = event.layer.partition(":")[2] or event.layer
            task = self._progress.add_task(f"layer {digest[:12]}", total=event.total)
            self._tasks[event.layer] = task
        self._progress.update(task, completed=event.bytes or 0, total=event.total)

    def close(self) -> None:
        """End an open line and stop the bars (also when the build failed)."""
        self._end_line()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> BuildView:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
