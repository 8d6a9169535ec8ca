"""Data of the local Austen tasks (lm-eval ``custom_dataset`` loaders; no download).

The jsonl files are made from the ``austen-lady-susan`` asset by
:func:`vtquant.eval.lm_eval_bridge.write_austen_data` into ``$VTQUANT_LM_EVAL_DATA`` if set, else
``<vtquant cache>/lm-eval-austen`` (made on first use, then reused).
"""
import os
from pathlib import Path


def _folder() -> Path:
    from vtquant import assets
    from vtquant.eval.lm_eval_bridge import write_austen_data

    env = os.environ.get("VTQUANT_LM_EVAL_DATA")
    folder = Path(env) if env else assets.home() / "lm-eval-austen"
    if not (folder / "austen_rolling.jsonl").exists() or not (folder / "austen_next_sentence.jsonl").exists():
        write_austen_data(folder)
    return folder


def load_rolling(**kwargs):
    from vtquant.eval.lm_eval_bridge import docs_as_dataset

    return docs_as_dataset(_folder() / "austen_rolling.jsonl")


def load_next_sentence(**kwargs):
    from vtquant.eval.lm_eval_bridge import docs_as_dataset

    return docs_as_dataset(_folder() / "austen_next_sentence.jsonl")
