"""kvcache as an LM Evaluation Harness backend: ``--model kvcache`` (needs ``pip install 'kvcache[lmeval]'``).

Importing this package registers the model name ``kvcache`` with ``lm_eval``. lm-eval 0.4 has no plugin
discovery for models, so the registration must happen in the process that runs the evaluation; two ways do
it (docs/lmeval.md):

- ``python -m kvcache.lmeval <lm_eval arguments>``: registers, then runs lm-eval's own command line (any
  task, any option);
- ``lm_eval --model kvcache ... --tasks DIR`` (or ``--tasks DIR/kvcache_passkey.yaml``) over the task files
  written by ``kvcache export-lmeval DIR``: their YAML names :func:`process_results` of this package, which
  lm-eval imports while it reads the task files, before it builds the model.
"""

from kvcache.lmeval.model import KVCacheLM, process_results

__all__ = ["KVCacheLM", "process_results"]
