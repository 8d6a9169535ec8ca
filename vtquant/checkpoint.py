"""Checkpoints of quantized models: :func:`save` and :func:`load`, written so that nothing is lost.

A checkpoint is a folder of three files::

    model.safetensors   every tensor (int8 codes, scales, templates, rotations, ...)
    vtquant.json        format version, adapter, model config, plan, recipe, report, and the
                        size and sha256 of the other files (verified by :func:`load`)
    recipe.yaml         the recipe, for people to read

Two layouts (``vtquant.json``'s ``format``): ``hf``, the default for transformers models, adds
``config.json`` with a ``quantization_config`` (``quant_method: vtquant``) and the tokenizer files, packs
W4 codes two per byte, and loads with ``AutoModelForCausalLM.from_pretrained`` in a process that has
imported vtquant (:mod:`vtquant.hf_integration`); ``vtquant``, the only one for timm / open_clip models,
is the three files above.  :func:`load` reads both.  A two-tower open_clip ``CLIP`` / ``CustomTextCLIP``
(quantized by :func:`vtquant.vision.quantize_clip_`) is one checkpoint: the open_clip model config
(rebuilt with open_clip, no download), and a plan, recipe and report per quantized tower in
``vtquant.json``'s ``towers``; :func:`load` returns the CLIP with a handle on each tower.

How a save protects what is on disk (torchao / safetensors keep the write itself; this module
adds the folder swap around it):

* the files are written into a hidden temporary sibling ``.NAME.tmp-PID-HOST-XXXX`` and moved into
  place with :func:`os.replace`; an existing checkpoint is first moved aside to ``.NAME.old``
  and deleted only once the new one is in place, file by file (only the files vtquant writes);
* the target must be missing, an empty folder, or a vtquant checkpoint: a regular file, a
  symbolic link or a folder holding anything else is refused with :class:`CheckpointError`
  before anything is written;
* a save killed between its two renames leaves the previous checkpoint in ``.NAME.old``: the
  next :func:`load` or :func:`save` at ``NAME`` moves it back and logs a warning;
* saves to one path take a lock (``.NAME.lock``, ``fcntl.flock``) around the swap, so
  concurrent saves all succeed and the last one wins.

:func:`load` checks every file against the sizes and sha256 in ``vtquant.json``; a damaged or
changed checkpoint raises :class:`CheckpointError` naming the file.  Checkpoints written before
checksums were recorded still load, with a warning that they are not verified.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn as nn

from .adapters.base import _REGISTRY, _import_builtin_adapters
from .core.pipeline import apply_plan_
from .core.plan import QuantPlan
from .errors import VtquantError
from .fileio import sha256_file
from .recipe import recipe_from_dict, recipe_to_yaml

__all__ = ["CheckpointError", "FORMAT_VERSION", "load", "load_tokenizer", "save"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "vtquant.json"
WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.yaml"
CHECKPOINT_FILES = (WEIGHTS_FILE, META_FILE, RECIPE_FILE)  # what save writes into every checkpoint folder
# (an hf-format checkpoint also holds config.json and tokenizer files: listed in vtquant.json's "files")
FORMATS = ("auto", "hf", "vtquant")
_REQUIRED_KEYS = ("format_version", "adapter", "model", "plan")
_CHUNK = 1 << 20
_LOAD_ATTEMPTS = 3  # a load that overlaps a concurrent save's swap is read again


class CheckpointError(VtquantError, ValueError):
    """A checkpoint that cannot be read (damaged, changed, incomplete) or a path that save refuses."""


PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------------------
# save
# ------------------------------------------------------------------------------------------
def save(model: nn.Module, path: PathLike, *, compact_embeddings: Optional[str] = None, format: str = "auto",
         tokenizer: Any = None) -> Path:
    """Save a quantized model: ``model.safetensors`` + ``vtquant.json`` (+ ``recipe.yaml``, + ``config.json``
    and the tokenizer in the ``hf`` layout).

    The folder is written to a temporary sibling and moved into place, so an interrupted save
    never leaves a half-written checkpoint.  ``path`` may be missing, an empty folder or an
    existing vtquant checkpoint (which is replaced); anything else is refused.

    Args:
        model: a model quantized by :func:`vtquant.quantize_` (or loaded by :func:`load`).
        path: the checkpoint folder.
        compact_embeddings: ``None`` (default) stores every tensor as it is; ``"int8"`` (per-row
            codes + scales) or ``"bf16"`` stores the full-precision embedding table and output head
            compactly on disk (see :mod:`vtquant.storage`); :func:`load` restores float tables.
        format: ``"hf"`` (transformers-native: ``config.json`` with ``quantization_config``, tokenizer,
            W4 packed; see :mod:`vtquant.hf_integration`), ``"vtquant"`` (the three files only) or
            ``"auto"`` (default): ``hf`` for transformers models (decoders, HF vision towers) saved without
            ``compact_embeddings`` (the ``vtquant`` layout holds every compact form, the ``hf`` one only
            ``"bf16"`` tables and no derived head), else ``vtquant``.
        tokenizer: written beside the model in the ``hf`` layout (default: ``model.vtquant.tokenizer``
            if one is attached, e.g. by :func:`load`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``model`` is not quantized by vtquant.
        CheckpointError: ``path`` is a file, a symbolic link or a folder that is not a vtquant
            checkpoint (nothing is written or deleted then).
    """
    handle = getattr(model, "vtquant", None)
    towers = _tower_handles(model) if handle is None else []
    if handle is None and not towers:
        raise ValueError("model is not quantized by vtquant; call vtquant.quantize_(model, recipe, calib) first "
                         "(or vtquant.vision.quantize_clip_ for a two-tower model)")
    if handle is not None and getattr(handle, "plan", None) is None:  # a handle of several parts (a VLM)
        raise CheckpointError(f"saving a quantized {type(model).__name__} is not supported yet "
                              f"({getattr(handle, 'save_hint', 'it has no single quantization plan')}); nothing was "
                              "written")
    if towers:
        fmt = _resolve_tower_format(model, format, compact_embeddings)
    else:
        fmt = _resolve_format(model, format, compact_embeddings)
    if tokenizer is None and handle is not None:
        tokenizer = getattr(handle, "tokenizer", None)
    given = Path(path)
    target = Path(os.path.abspath(given))
    _check_target(target)  # before minutes of writing
    tmp = _make_tmp(target)
    try:
        if towers:
            _write_tower_checkpoint(model, towers, tmp)
        else:
            _write_checkpoint(model, handle, tmp, compact_embeddings, fmt, tokenizer)
        with _locked(target):
            _recover(target)
            _check_target(target)  # again: another process may have put something there meanwhile
            _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return given


def _resolve_format(model: nn.Module, fmt: str, compact_embeddings: Optional[str]) -> str:
    from .hf_integration import supports_hf_format

    if fmt not in FORMATS:
        raise CheckpointError(f"format={fmt!r}: use one of {list(FORMATS)} (nothing was written)")
    if fmt == "auto":
        return "hf" if supports_hf_format(model) and compact_embeddings is None else "vtquant"
    if fmt == "hf":
        if not supports_hf_format(model):
            raise CheckpointError(f"format='hf' needs a transformers model (an HF decoder or vision tower); "
                                  f"{type(model).__name__} is saved with format='vtquant' (nothing was written)")
        if compact_embeddings not in (None, "bf16"):
            raise CheckpointError(f"format='hf' stores embeddings in full precision or bfloat16; "
                                  f"compact_embeddings={compact_embeddings!r} needs format='vtquant' (nothing was "
                                  "written)")
    return fmt


def _tower_handles(model: nn.Module) -> list[tuple[str, Any]]:
    """``[(module path, QuantHandle)]`` of the quantized towers of a multi-tower model (an open_clip
    ``CLIP`` quantized by :func:`vtquant.vision.quantize_clip_` carries one handle per tower)."""
    from .core.pipeline import QuantHandle

    return [(name, mod.vtquant) for name, mod in model.named_modules()
            if name and isinstance(getattr(mod, "vtquant", None), QuantHandle)]


def _resolve_tower_format(model: nn.Module, fmt: str, compact_embeddings: Optional[str]) -> str:
    if fmt not in FORMATS:
        raise CheckpointError(f"format={fmt!r}: use one of {list(FORMATS)} (nothing was written)")
    if fmt == "hf":
        raise CheckpointError(f"format='hf' is for transformers models; the towers of a {type(model).__name__} are "
                              "saved with format='vtquant' (nothing was written)")
    if compact_embeddings is not None:
        raise CheckpointError(f"compact_embeddings={compact_embeddings!r} is for LLM embedding tables; a "
                              f"{type(model).__name__}'s towers are saved as they are (nothing was written)")
    return "vtquant"


def _write_tower_checkpoint(model: nn.Module, towers: list, folder: Path) -> None:
    """A multi-tower model: ``model.safetensors`` with every tower, ``vtquant.json`` with the model config
    (:meth:`model_config_dict` of the model's adapter class) and one plan / recipe / report per tower."""
    from safetensors.torch import save_model

    import vtquant
    from .adapters.base import ModelAdapter

    adapter_cls = ModelAdapter.adapter_class(model)
    config_of = getattr(adapter_cls, "model_config_dict", None)
    if config_of is None:
        raise NotImplementedError(f"saving a {type(model).__name__} with quantized towers is not supported "
                                  f"({adapter_cls.__name__} cannot describe the whole model); save each tower")
    config = config_of(model)
    entries = []
    for name, handle in towers:
        recipe = getattr(handle, "recipe", None)
        entries.append({"module": name, "adapter": type(handle.adapter).__name__, "plan": _plan_dict(handle.plan),
                        "recipe_yaml": recipe_to_yaml(recipe) if recipe else None,
                        "report": handle.report.to_dict() if handle.report else None})
    save_model(model, str(folder / WEIGHTS_FILE))
    first = towers[0][1]
    meta = {
        "format_version": FORMAT_VERSION,
        "format": "vtquant",
        "written_by": f"vtquant {vtquant.__version__}",
        "adapter": adapter_cls.__name__,
        "model": config,
        "plan": None,  # one per tower, in "towers"
        "towers": entries,
        "fp_reference": getattr(first, "fp_reference", None),
        "files": {WEIGHTS_FILE: _file_record(folder / WEIGHTS_FILE)},
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    _usual_permissions(folder)
    for name in (WEIGHTS_FILE, META_FILE):
        _fsync(folder / name)
    _fsync(folder)


def _plan_dict(plan: QuantPlan) -> dict:
    """The plan as JSON data."""
    return plan.to_dict()


def _write_checkpoint(model: nn.Module, handle: Any, folder: Path, compact_embeddings: Optional[str],
                      fmt: str = "vtquant", tokenizer: Any = None) -> None:
    """Write the checkpoint files into ``folder``; ``vtquant.json`` last, with the others' checksums."""
    from safetensors.torch import save_model

    import vtquant

    storage = None
    extra_files: list = []
    recipe = getattr(handle, "recipe", None)
    recipe_yaml = recipe_to_yaml(recipe) if recipe else None
    if fmt == "hf":
        import safetensors.torch

        from . import hf_integration as hf

        safetensors.torch.save_file(hf.hf_state_dict(model, compact_embeddings), str(folder / WEIGHTS_FILE),
                                    metadata={"format": "pt"})
        qconfig = hf.quantization_config_dict(model, recipe_yaml)
        (folder / hf.CONFIG_FILE).write_text(json.dumps(hf.model_config_dict(model, qconfig), indent=1) + "\n",
                                             encoding="utf-8")
        extra_files.append(hf.CONFIG_FILE)
        if tokenizer is not None:
            extra_files += [n for n in hf.save_tokenizer(tokenizer, folder) if n not in CHECKPOINT_FILES]
    elif compact_embeddings is not None:
        from .storage import save_compact

        storage = save_compact(model, str(folder / WEIGHTS_FILE), compact_embeddings)
    else:
        save_model(model, str(folder / WEIGHTS_FILE))
    if recipe_yaml is not None:
        (folder / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
    written = [name for name in (WEIGHTS_FILE, RECIPE_FILE) if (folder / name).exists()] + extra_files
    meta = {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "written_by": f"vtquant {vtquant.__version__}",
        "adapter": type(handle.adapter).__name__,
        "model": handle.adapter.config_dict(),
        "plan": _plan_dict(handle.plan),
        "recipe_yaml": recipe_yaml,
        "report": handle.report.to_dict() if handle.report else None,
        "fp_reference": getattr(handle, "fp_reference", None),
        "files": {name: _file_record(folder / name) for name in written},
    }
    if storage is not None:
        meta["storage"] = storage
    (folder / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    _usual_permissions(folder)
    for name in written + [META_FILE]:
        _fsync(folder / name)
    _fsync(folder)


def _file_record(file: Path) -> dict:
    return {"size": file.stat().st_size, "sha256": sha256_file(file)}


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _usual_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders (and safetensors may write 0600 files): give the checkpoint the
    permissions of a normally created folder, as the user's umask says."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for child in folder.iterdir():
        os.chmod(child, 0o666 & ~umask)


# ------------------------------------------------------------------------------------------
# the target folder and its hidden siblings
# ------------------------------------------------------------------------------------------
def _sibling(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}.{suffix}")


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _host_tag() -> str:
    """A short tag of this machine: temporary folders are only judged abandoned by their own host."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _make_tmp(target: Path) -> Path:
    """A new hidden folder beside ``target`` (same filesystem, so the final rename is atomic)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=target.parent,
                                     prefix=f"{_tmp_prefix(target)}{os.getpid()}-{_host_tag()}-"))
    except (FileExistsError, NotADirectoryError) as err:
        raise CheckpointError(f"cannot save to {target}: {err.filename or target.parent} is not a folder; "
                              "choose another path") from None
    except PermissionError as err:
        raise CheckpointError(f"cannot save to {target}: no permission to write in {err.filename or target.parent}; "
                              "choose another path") from None


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _not_a_checkpoint(folder: Path, entries: list[str]) -> Optional[str]:
    """Why the non-empty ``folder`` is not a checkpoint written by vtquant (``None`` if it is one)."""
    if META_FILE not in entries:
        return f"no {META_FILE}; it holds {_listing(entries)}"
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        meta = None
        problem = f"its {META_FILE} cannot be read: {err}"
    foreign = [name for name in entries if name not in _own_files(meta)]
    if foreign:
        return f"it holds files vtquant did not write: {_listing(foreign)}"
    if meta is None:
        return problem
    if not isinstance(meta, dict) or "format_version" not in meta or "adapter" not in meta:
        return f"its {META_FILE} was not written by vtquant"
    return None


def _plain_name(name: Any) -> bool:
    """A file name without a folder part (what vtquant.json may list)."""
    return isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name \
        and "/" not in name and "\\" not in name


def _own_files(meta: Any) -> set:
    """Names of the files vtquant wrote into a checkpoint: the fixed ones and those its vtquant.json lists."""
    own = set(CHECKPOINT_FILES)
    files = meta.get("files") if isinstance(meta, dict) else None
    if isinstance(files, dict):
        own.update(name for name in files if _plain_name(name))
    return own


def _check_target(target: Path) -> None:
    """Refuse a save target that is not missing, an empty folder or a vtquant checkpoint."""
    if os.path.islink(target):
        raise CheckpointError(f"cannot save to {target}: it is a symbolic link (to {os.path.realpath(target)}); "
                              "save to a real folder path instead (nothing was changed)")
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise CheckpointError(f"cannot save to {target}: it is an existing file, not a vtquant checkpoint folder; "
                              "choose another path or remove the file yourself (nothing was changed)")
    try:
        entries = sorted(os.listdir(target))
    except FileNotFoundError:  # moved away by a concurrent save's swap
        return
    if not entries:
        return
    problem = _not_a_checkpoint(target, entries)
    if problem is not None:
        raise CheckpointError(f"cannot save to {target}: the folder exists and is not a vtquant checkpoint "
                              f"({problem}); vtquant replaces only its own checkpoints or an empty folder: "
                              "choose another path or remove the folder yourself (nothing was changed)")


def _remove_checkpoint(folder: Path) -> None:
    """Delete the files vtquant writes in ``folder``, then the folder if that left it empty."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    for name in sorted(_own_files(meta) - {META_FILE}) + [META_FILE]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / name)
    try:
        os.rmdir(folder)
    except OSError:
        left = sorted(os.listdir(folder)) if folder.is_dir() else []
        log.warning("kept %s: it holds files vtquant did not write (%s)", folder, _listing(left))


def _swap_in(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` folder to ``target``, replacing a checkpoint or empty folder there."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
    else:
        old = _sibling(target, "old")
        if os.path.lexists(old):  # not removed by _recover: not vtquant's
            raise CheckpointError(f"cannot replace {target}: {old} exists and holds files vtquant did not write "
                                  "(it is where the old checkpoint goes during the swap); move it away yourself "
                                  "(nothing was changed)")
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        _remove_checkpoint(old)
    _fsync(target.parent)


def _recover(target: Path) -> None:
    """Finish what an interrupted save left beside ``target`` (call with the lock held).

    * ``target`` missing and ``.NAME.old`` present: the save was killed between its two renames;
      the previous checkpoint is moved back.
    * both present: the save was killed after its swap, before deleting the old copy; the old
      copy is deleted if it is a vtquant checkpoint.
    * temporary folders of save processes that no longer run are deleted.
    """
    old = _sibling(target, "old")
    if os.path.isdir(old) and not os.path.islink(old):
        if not os.path.lexists(target):
            os.replace(old, target)
            log.warning("%s: an earlier save was interrupted while replacing this checkpoint; restored the "
                        "previous checkpoint from %s", target, old)
        else:
            entries = sorted(os.listdir(old))
            if not entries or _not_a_checkpoint(old, entries) is None:
                _remove_checkpoint(old)
                log.info("%s: deleted the previous checkpoint %s left by an interrupted save", target, old)
    for tmp in _abandoned_tmps(target):
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("%s: deleted %s left by an interrupted save", target, tmp)


def _abandoned_tmps(target: Path) -> list[Path]:
    """Temporary folders ``.NAME.tmp-PID-HOST-XXXX`` beside ``target`` whose save process (on this
    machine) has ended."""
    if os.name != "posix":
        return []
    prefix = _tmp_prefix(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    host = _host_tag()
    out = []
    for name in names:
        parts = name[len(prefix):].split("-", 2) if name.startswith(prefix) else []
        if len(parts) == 3 and parts[0].isdigit() and parts[1] == host and not _process_running(int(parts[0])):
            out.append(target.parent / name)
    return out


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but belongs to someone else
        return True
    return True


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``target``'s lock file ``.NAME.lock`` (removed on release).

    The lock file is unlinked before it is unlocked; a waiter that then locks the unlinked file
    sees that it is no longer the one at the path and tries again.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    lock_file = _sibling(target, "lock")
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(lock_file)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_file)
        os.close(fd)


# ------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------
def load(path: PathLike, *, device: Optional[str] = None) -> nn.Module:
    """Load a checkpoint written by :func:`save`; returns the quantized model in eval mode.

    Every file is checked against the size and sha256 recorded in ``vtquant.json``.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no ``vtquant.json``.
        CheckpointError: the checkpoint is damaged, changed after saving, incomplete, or of an
            unsupported format (the message names the file).
    """
    target = Path(os.path.abspath(Path(path)))
    old = _sibling(target, "old")
    if not os.path.lexists(target) and os.path.isdir(old):
        try:
            with _locked(target):
                _recover(target)
        except OSError as err:
            raise CheckpointError(f"{target} is missing: an interrupted save left the previous checkpoint in {old} "
                                  f"and it could not be moved back ({err}); rename it to {target} yourself") from None
    for attempt in range(_LOAD_ATTEMPTS):
        before = _identity(target)
        try:
            model = _load_once(target, device)
        except (CheckpointError, FileNotFoundError):
            if attempt + 1 < _LOAD_ATTEMPTS and _identity(target) != before:
                continue  # a concurrent save replaced the folder while it was read
            raise
        if _identity(target) == before:
            return model
    raise CheckpointError(f"{target} was replaced by other saves {_LOAD_ATTEMPTS} times while it was loaded; "
                          "load it again when no save is writing it")


def _identity(folder: Path) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _read_meta(target: Path) -> dict:
    meta_file = target / META_FILE
    if not target.exists():
        raise FileNotFoundError(f"{target}: no such checkpoint folder")
    if not target.is_dir():
        raise CheckpointError(f"{target} is a file, not a vtquant checkpoint folder")
    try:
        text = meta_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{target} is not a vtquant checkpoint (no {META_FILE}); "
                                "save one with vtquant.save()") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_file} cannot be read ({err}); the checkpoint is damaged") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_file} is damaged: not valid JSON ({err.msg} at line {err.lineno}, column "
                              f"{err.colno}); the checkpoint is corrupt: restore it from a copy or save it "
                              "again") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file} is damaged: it holds a JSON {type(meta).__name__}, not an object; "
                              "the checkpoint is corrupt")
    if "format_version" in meta and meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{target}: checkpoint format {meta['format_version']!r} is not supported "
                              f"(this vtquant reads {FORMAT_VERSION})")
    missing = [key for key in _REQUIRED_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"{meta_file} is damaged: no {', '.join(map(repr, missing))} "
                              f"{'entry' if len(missing) == 1 else 'entries'}; the checkpoint is corrupt: "
                              "restore it from a copy or save it again")
    return meta


def _verify_files(target: Path, meta: dict) -> None:
    """Check the files against the sizes and sha256 that save recorded in ``vtquant.json``."""
    files = meta.get("files")
    if files is None:
        log.warning("%s: written by an older vtquant that recorded no checksums; its files are not verified "
                    "(load and save it again to add them)", target)
        return
    meta_file = target / META_FILE
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise CheckpointError(f"{meta_file} is damaged: its 'files' entry does not list {WEIGHTS_FILE}")
    for name, record in files.items():
        if not _plain_name(name) or name == META_FILE or not isinstance(record, dict) \
                or not isinstance(record.get("size"), int) or not isinstance(record.get("sha256"), str):
            raise CheckpointError(f"{meta_file} is damaged: bad 'files' entry {name!r}")
        file = target / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{file} is missing: the checkpoint is incomplete; restore it from a copy "
                                  "or save it again") from None
        if size != record["size"]:
            raise CheckpointError(f"{file} has {size} bytes but {record['size']} were saved: the checkpoint is "
                                  "corrupt (truncated or changed after saving); restore it from a copy or save "
                                  "it again")
        digest = sha256_file(file)
        if digest != record["sha256"]:
            raise CheckpointError(f"{file} does not match the sha256 recorded when it was saved ({digest[:12]}... "
                                  f"instead of {record['sha256'][:12]}...): the checkpoint is corrupt (changed "
                                  "after saving); restore it from a copy or save it again")


def _load_once(target: Path, device: Optional[str]) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    meta = _read_meta(target)
    _verify_files(target, meta)
    meta_file = target / META_FILE
    if meta.get("format", "vtquant") == "hf":
        return _load_hf(target, meta, device)
    if meta.get("format", "vtquant") != "vtquant":
        raise CheckpointError(f"{meta_file}: checkpoint layout {meta.get('format')!r} is not known to this vtquant "
                              "(reads 'hf' and 'vtquant'); update vtquant")
    _import_builtin_adapters()
    adapter_cls = next((c for c in _REGISTRY.values() if c.__name__ == meta["adapter"]), None)
    if adapter_cls is None:
        raise CheckpointError(f"{target}: adapter {meta['adapter']!r} is not available; import the module "
                              "that defines it")
    towers = meta.get("towers")

    def skeleton() -> tuple[nn.Module, list]:
        model = adapter_cls.from_config_dict(meta["model"])
        if towers is not None:
            return model, _apply_tower_plans(model, adapter_cls, towers)
        adapter = adapter_cls(model)
        apply_plan_(model, adapter, meta["plan"])
        return model, [(model.vtquant, meta.get("recipe_yaml"))]

    def applied(build: Any) -> tuple[nn.Module, list]:
        try:
            return build()
        except (KeyError, TypeError, IndexError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{meta_file}: its model config or plan cannot be applied "
                                  f"({type(err).__name__}: {err}); the checkpoint is damaged or was written by an "
                                  "incompatible vtquant") from err

    def on_meta_device() -> tuple[nn.Module, list]:
        with parameters_on_meta():
            return skeleton()

    # parameters on the meta device: no full-precision random initialisation of the model, only the storage the
    # quantized skeleton needs, filled from the file below (buffers the constructor computes stay real)
    # tensors take the dtype they were saved in (a model quantized in bf16 loads in bf16, its quantizer
    # scales in float32); compact embedding storage converts its own tables
    dtypes = {} if meta.get("storage") else _file_dtypes(target / WEIGHTS_FILE)
    try:
        model, handles = applied(on_meta_device)
        _match_dtypes_(model, dtypes)
        unfilled = _materialize_meta_(model, device or "cpu")
    except (RuntimeError, NotImplementedError) as err:  # a constructor that cannot run on meta tensors
        unfilled = [f"({_first_line(err)})"]
    if unfilled:  # tensors the file does not hold would have no values: build the model in full instead
        log.info("%s: not loadable through the meta device (%s); building the model in full first", target,
                 ", ".join(unfilled[:3]))
        model, handles = applied(skeleton)
        _match_dtypes_(model, dtypes)
    for handle, recipe_yaml in handles:
        if recipe_yaml:
            import yaml

            try:
                handle.recipe = recipe_from_dict(yaml.safe_load(recipe_yaml))
            except (yaml.YAMLError, KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{meta_file}: its recipe cannot be read ({err}); the checkpoint is "
                                      "damaged") from err
        handle.fp_reference = meta.get("fp_reference")
    if device is not None:
        model.to(device)
    weights = target / WEIGHTS_FILE
    try:
        if meta.get("storage"):
            from .storage import load_compact

            load_compact(model, str(weights), meta["storage"], device=device or "cpu")
        else:
            load_model(model, str(weights), strict=True, device=device or "cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{weights} is missing: the checkpoint is incomplete") from None
    except torch.cuda.OutOfMemoryError:
        raise
    except (SafetensorError, RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{weights} cannot be loaded ({type(err).__name__}: {_first_line(err)}); the "
                              "checkpoint is corrupt or does not match its vtquant.json") from err
    return model.eval()


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside goes to the meta device as soon as it is made, so model
    constructors allocate no weights and their random initialisation runs on meta tensors (no work);
    buffers stay where they are made (they often hold computed constants).  The technique of
    accelerate's ``init_empty_weights(include_buffers=False)``."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register(module, name, param)
        param = module._parameters.get(name)
        if param is not None and not param.is_meta:
            extra = dict(param.__dict__)
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name].__dict__.update(extra)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _file_dtypes(weights: Path) -> dict:
    """``{name: torch dtype}`` of the tensors in a safetensors file (its header only; ``{}`` if unreadable:
    the load that follows reports the problem)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {name: f.get_slice(name).get_dtype() for name in f.keys()}
    except (OSError, SafetensorError, ValueError):
        return {}


_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _match_dtypes_(model: nn.Module, dtypes: dict) -> None:
    """Floating parameters / buffers whose saved tensor has another floating dtype take that dtype (so
    loading does not cast them); tied tensors stay tied."""
    done: dict = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = mod_name + "." if mod_name else ""
        for kind in ("_parameters", "_buffers"):
            table = getattr(module, kind)
            for name, t in list(table.items()):
                want = _SAFE_DTYPES.get(dtypes.get(prefix + name, ""))
                if t is None or want is None or not t.is_floating_point() or not want.is_floating_point \
                        or want == t.dtype:
                    continue
                new = done.get(id(t))
                if new is None:
                    data = t.detach().to(want)
                    new = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
                    done[id(t)] = new
                table[name] = new


def _materialize_meta_(model: nn.Module, device: Union[str, torch.device]) -> list[str]:
    """Give every meta parameter / buffer of ``model`` empty storage on ``device`` (the file fills them;
    tied parameters stay tied).  Returns what the file cannot fill: meta tensors outside the state dict
    (non-persistent buffers, tensors kept as plain attributes), which would keep garbage values."""
    made: dict = {}
    names: set = set()
    loose: list[str] = []
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = mod_name + "." if mod_name else ""
        for kind in ("_parameters", "_buffers"):
            table = getattr(module, kind)
            for name, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                names.add(prefix + name)
                new = made.get(id(t))
                if new is None:
                    data = torch.empty_like(t, device=device)
                    new = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
                    made[id(t)] = new
                table[name] = new
        for name, value in vars(module).items():
            items = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, torch.Tensor) and v.is_meta for v in items):
                loose.append(prefix + name)
    return sorted(names - set(model.state_dict().keys())) + loose


def _apply_tower_plans(model: nn.Module, adapter_cls: type, towers: list) -> list:
    """Rebuild each saved tower's quantized structure on the fresh ``model``; ``[(handle, recipe yaml)]``."""
    if not isinstance(towers, list) or not towers:
        raise ValueError("'towers' must be a non-empty list")
    listed = {id(t.module): t for t in adapter_cls.towers(model)}
    out = []
    for entry in towers:
        module = model.get_submodule(entry["module"])
        tower = listed.get(id(module))
        if tower is None:
            raise ValueError(f"{entry['module']!r} is not a tower of {type(model).__name__}")
        if type(tower.adapter).__name__ != entry["adapter"]:
            raise ValueError(f"tower {entry['module']!r} was quantized through {entry['adapter']}, but gets "
                             f"{type(tower.adapter).__name__} now")
        apply_plan_(module, tower.adapter, entry["plan"])
        out.append((module.vtquant, entry.get("recipe_yaml")))
    return out


def _load_hf(target: Path, meta: dict, device: Optional[str]) -> nn.Module:
    """An hf-layout checkpoint: through transformers' ``from_pretrained`` with vtquant's quantizer."""
    from safetensors import SafetensorError

    from .hf_integration import CONFIG_FILE, load_hf_folder

    meta_file, config_file = target / META_FILE, target / CONFIG_FILE
    if CONFIG_FILE not in (meta.get("files") or {CONFIG_FILE: None}):
        raise CheckpointError(f"{meta_file} is damaged: an hf-layout checkpoint must list {CONFIG_FILE}")
    try:
        QuantPlan.from_dict(meta["plan"])
    except (KeyError, TypeError, IndexError, ValueError) as err:
        raise CheckpointError(f"{meta_file}: its model config or plan cannot be applied ({type(err).__name__}: "
                              f"{err}); the checkpoint is damaged or was written by an incompatible vtquant") from err
    try:
        qconfig = json.loads(config_file.read_text(encoding="utf-8"))["quantization_config"]
    except FileNotFoundError:
        raise CheckpointError(f"{config_file} is missing: the checkpoint is incomplete") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{config_file} is damaged: no readable quantization_config ({err})") from err
    if not isinstance(qconfig, dict) or qconfig.get("plan") != meta["plan"]:
        raise CheckpointError(f"{config_file} and {meta_file} disagree on the quantization plan: the checkpoint was "
                              "changed after saving; restore it from a copy or save it again")
    try:
        model = load_hf_folder(target, device)
    except torch.cuda.OutOfMemoryError:
        raise
    except SafetensorError as err:
        raise CheckpointError(f"{target / WEIGHTS_FILE} cannot be loaded ({type(err).__name__}: {_first_line(err)}); "
                              "the checkpoint is corrupt") from err
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, OSError) as err:
        raise CheckpointError(f"{target} cannot be loaded ({type(err).__name__}: {_first_line(err)}); the checkpoint "
                              f"is corrupt or its {WEIGHTS_FILE} does not match its {CONFIG_FILE}") from err
    model.vtquant.fp_reference = meta.get("fp_reference")
    try:
        model.vtquant.tokenizer = load_tokenizer(target)
    except (OSError, ValueError) as err:
        log.warning("%s: its tokenizer files cannot be read (%s); loaded the model without a tokenizer", target, err)
    return model


def load_tokenizer(path: PathLike) -> Any:
    """The tokenizer saved in a checkpoint folder (``AutoTokenizer``), or ``None`` if it holds none."""
    folder = Path(path)
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
