"""`edge-duet infer`: run the proactive session over examples in MMDuet2's frame-input format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from . import remote_options as ro
from .common import handle_errors


def register(app: typer.Typer) -> None:
    @app.command("infer")
    @handle_errors
    def infer_cmd(
        input_json: Path = typer.Argument(..., help="Examples: a JSON list in MMDuet2's frame-input format."),
        output: Path = typer.Option(..., "-o", "--output", help="Predictions (JSONL, one line per example)."),
        model: Optional[Path] = typer.Option(None, "--model", "-m", help="Bundle directory (default: the bundled demo model)."),
        max_new_tokens: int = typer.Option(64, help="Longest reply, in tokens."),
        system_prompt: Optional[str] = typer.Option(None, help="System prompt (default: the bundle's)."),
        token_drop: Optional[float] = typer.Option(None, help="Drop visual tokens whose cosine similarity to the previous frame's exceeds this."),
        max_context: Optional[int] = typer.Option(None, help="Maximum context in tokens (default: the bundle's)."),
        providers: Optional[str] = typer.Option(None, help="cpu, cuda or tensorrt (comma-separated for a list)."),
        decoder: str = typer.Option("auto", help="Decoder flavour: auto (fused on the CPU when the bundle has it), "
                                                 "plain or fused."),
        server: Optional[str] = ro.SERVER,
        served_model: Optional[str] = ro.SERVED_MODEL,
        server_token: Optional[str] = ro.SERVER_TOKEN,
        server_api: str = ro.SERVER_API,
        server_image: str = ro.SERVER_IMAGE,
        server_timeout: float = ro.SERVER_TIMEOUT,
    ):
        """Run a bundle over frame-input examples and write the replies (JSONL, as `edge-duet eval` reads them)."""
        from tqdm import tqdm

        from edge_duet.apps.outputs import atomic_path, check_file
        from edge_duet.runtime.infer import load_examples, run_example
        from edge_duet.runtime.session import SessionOptions

        remote = ro.server_options(server, served_model, server_token, server_api, server_image, server_timeout)
        check_file(output, "-o", "pred.jsonl")
        examples = load_examples(input_json)
        session = ro.open_session(model, remote, SessionOptions(
            system_prompt=system_prompt, max_new_tokens=max_new_tokens, max_context_tokens=max_context,
            token_drop_threshold=token_drop, providers=tuple(providers.split(",")) if providers else None,
            decoder=decoder))
        replies = 0
        with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for ex in tqdm(examples, desc="infer", unit="example", disable=None):
                record = run_example(session, ex)
                replies += sum(r["role"] == "assistant" for r in record["model_response_list"])
                f.write(json.dumps(record) + "\n")
        typer.echo(f"wrote {len(examples)} examples ({replies} replies) to {output}")
