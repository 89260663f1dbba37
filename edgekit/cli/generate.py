"""``edgekit generate MODEL "prompt"``: stream a decoder's greedy continuation (and the original's beside it)."""

from __future__ import annotations

import click

from edgekit.cli.common import json_option, write_json


@click.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens to generate (greedy).")
@click.option("--compare", "compare", type=click.Path(), default=None,
              help="The ORIGINAL checkpoint (or another export): its continuation is shown beside MODEL's.")
@click.option("--no-stop", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads (default: all cores).")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow a checkpoint that ships its own Python code (auto_map) to run it.")
@json_option
def generate(model, prompt, new_tokens, compare, no_stop, threads, trust_remote_code, json_out):
    """Continue PROMPT with MODEL (a decoder's export, quantized or not, or its checkpoint), streaming it."""
    from dataclasses import asdict

    from edgekit.generate import generate as run_generate

    streaming, shown = json_out is None, []

    def show(piece: str) -> None:  # the prompt first, once the model has started (not before a refusal)
        if not shown:
            click.echo(prompt, nl=False)
            shown.append(True)
        click.echo(piece, nl=False)

    g = run_generate(model, prompt, new_tokens, compare, threads, stop_at_eos=not no_stop,
                     trust_remote_code=trust_remote_code, on_token=show if streaming else None)
    if json_out is not None:
        write_json(json_out, asdict(g))
        if json_out != "-":
            click.echo(g.text)
        return
    click.echo("")
    rate = f", {g.decode_tokens_per_s:.1f} tokens/s decoding" if g.decode_tokens_per_s else ""
    click.echo(f"[{len(g.tokens)} tokens on {g.runtime}; first token after {1000 * g.ttft_s:.0f} ms{rate}]", err=True)
    if g.original is not None:
        o = g.original
        click.echo(f"\nOriginal ({o['model']}):\n{prompt}{o['text']}")
        same = o["identical_prefix"]
        click.echo(f"[identical for the first {same} of {len(o['tokens'])} tokens]", err=True)
