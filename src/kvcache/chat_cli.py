"""``kvcache chat``: a conversation in the terminal (or from a script on stdin) that keeps its cache.

In a terminal: a rich prompt, the reply streamed as it is generated, and commands (``/stats``, ``/save FILE``,
``/reset``, ``/quit``). From a pipe: one line of stdin per turn (commands included), each reply streamed to
stdout on its own line; the first error ends the run with the CLI's exit codes.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from kvcache import cli_options as opts

if TYPE_CHECKING:
    from rich.console import Console

    from kvcache.chat import Chat

HELP = """commands:
  /stats         per-turn tokens read, tokens held and cache bytes
  /save FILE     save the conversation (refuses an existing file; /save! FILE replaces it)
  /reset         forget the conversation (the system prompt is read again)
  /help          this text
  /quit          leave (also Ctrl-D)"""


def chat_command(
    model: str = typer.Option("default", "--model", "-m",
                              help="'default' (bundled), a local model directory or a Hugging Face Hub id."),
    cache: Annotated[str | None, typer.Option(
        "--cache", "-c", help="Cache spec (default: dynamic, or the resumed file's).")] = None,
    max_new_tokens: opts.MaxNewTokensOption = 128,
    resume: str | None = typer.Option(None, "--resume", "-r",
                                      help="Continue a conversation saved with /save."),
    system: str | None = typer.Option(None, "--system", help="System prompt (or document) read first."),
    max_cache_len: int | None = typer.Option(None, "--max-cache-len", min=1,
                                             help="Capacity of a static layout given without capacity=N."),
    temperature: opts.TemperatureOption = 0.0,
    top_k: opts.TopKOption = None,
    top_p: opts.TopPOption = None,
    seed: opts.SeedOption = None,
    device: str | None = typer.Option(None, "--device", help="Torch device: cpu (default), cuda, ..."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, bfloat16, float16 (default: model's)."),
    threads: int | None = typer.Option(None, "--threads", min=1,
                                       help="CPU threads (default: 1 for models under 100M parameters, "
                                            "else torch's default)."),
) -> None:
    """Chat with a model; each turn reads only its new tokens on top of the kept cache."""
    from transformers.utils import logging as transformers_logging

    from kvcache.chat import Chat
    from kvcache.models import load
    from kvcache.sampling import Sampler
    from kvcache.spec import CacheSpec
    from kvcache.threads import choose_threads

    transformers_logging.disable_progress_bar()
    if cache is not None:
        CacheSpec.parse(cache).require_available()
    Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
    lm, tokenizer = load(model, device=device, dtype=dtype)
    choose_threads(lm, threads)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    if resume:
        chat = Chat.load(resume, lm, tokenizer, cache=cache, max_new_tokens=max_new_tokens, **sampling)
    else:
        chat = Chat(lm, tokenizer, cache or "dynamic", system=system, max_new_tokens=max_new_tokens,
                    max_cache_len=max_cache_len, **sampling)
    if sys.stdin.isatty():
        _interactive(chat, resumed=bool(resume))
    else:
        _scripted(chat)


def _scripted(chat: Chat) -> None:
    """One stdin line per turn; replies streamed to stdout; errors end the run."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    for raw in sys.stdin:
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(chat, line, console):
                return
            continue
        _reply(chat, line)


def _interactive(chat: Chat, resumed: bool) -> None:
    """The terminal loop: a rich prompt, streamed replies, commands; errors are shown and the loop goes on."""
    from rich.console import Console

    from kvcache.cli_errors import classify

    console = Console(highlight=False, soft_wrap=True)
    turns = sum(1 for m in chat.messages if m["role"] == "user")
    console.print(f"[dim]kvcache chat · cache {chat.spec} · "
                  f"{'resumed after ' + str(turns) + ' turns · ' if resumed else ''}/help for commands[/]")
    while True:
        try:
            line = console.input("[bold green]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not _command(chat, line, console):
                    return
                continue
            console.print("[bold blue]model>[/] ", end="")
            _reply(chat, line)
        except KeyboardInterrupt:
            console.print("\n[yellow]interrupted[/]")
        except Exception as err:  # shown, and the conversation goes on (the CLI's own one-line message)
            console.print(f"[red]error:[/] {classify(err)[1]}", markup=True, highlight=False)


def _reply(chat: Chat, text: str) -> None:
    """Send ``text``; stream the reply to stdout, then end its line."""

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    chat.send(text, on_text=show)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _command(chat: Chat, line: str, console: Console) -> bool:
    """Run a ``/command``; return False to leave."""
    from kvcache.errors import KVCacheError

    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return False
    if name == "/help":
        console.print(HELP, markup=False)
    elif name == "/stats":
        _print_stats(chat, console)
    elif name == "/reset":
        chat.reset()
        console.print("conversation reset")
    elif name in ("/save", "/save!"):
        if not arg:
            raise KVCacheError("/save needs a file name: /save chat.safetensors")
        try:
            path = chat.save(arg, overwrite=name == "/save!")
        except FileExistsError as err:
            raise KVCacheError(f"{arg} exists; use /save! {arg} to replace it, or another name") from err
        console.print(f"saved {len(chat.token_ids)} tokens to {path}", markup=False)
    else:
        raise KVCacheError(f"unknown command {name}; /help lists the commands")
    return True


def _print_stats(chat: Chat, console: Console) -> None:
    from rich.table import Table

    table = Table("turn", "role", "tokens read", "new tokens", "tokens seen", "tokens held", "cache bytes",
                  "prefill ms", "decode ms", title=f"cache {chat.spec}")
    for i, s in enumerate(chat.stats):
        table.add_row(str(i), s.role, str(s.tokens_read), str(s.new_tokens), str(s.tokens_seen),
                      str(s.tokens_held), f"{s.cache_bytes:,}", f"{s.prefill_seconds * 1e3:.1f}",
                      f"{s.decode_seconds * 1e3:.1f}")
    console.print(table)
    console.print(f"total tokens read: {chat.tokens_read}", markup=False)
