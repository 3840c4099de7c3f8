"""``python -m kvcache.lmeval <lm_eval arguments>``: lm-eval's command line with ``--model kvcache``
registered (e.g. ``python -m kvcache.lmeval --model kvcache --model_args pretrained=default,cache=full
--tasks DIR``)."""

from __future__ import annotations

import kvcache.lmeval  # noqa: F401  (registers --model kvcache)


def main() -> None:
    """Run lm-eval's command line on ``sys.argv``."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
