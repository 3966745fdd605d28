"""Finding a model: an exported folder, a Hub repo holding one, or a torch checkpoint to export.

Downloads happen only here (called from `Dia.from_pretrained` and `python -m export --model`), into a
cache the caller can choose (`cache_dir`, else `$DIA_ORT_CACHE`, else `~/.cache/dia_ort`).
"""

from __future__ import annotations

import logging
import os
import re
from importlib.metadata import entry_points
from pathlib import Path

from dia_ort.manifest import MANIFEST_NAME, QUANTIZED_DTYPES, Manifest
from dia_ort.verified import cache_root

log = logging.getLogger(__name__)

EXPORTER_GROUP = "dia_ort.exporters"  # entry points that export a torch checkpoint (pyproject.toml)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(model_id: str) -> bool:
    """Whether `model_id` names a Hub repo: `owner/name`, and neither it nor `owner/` is a local path.

    `models/dia` where `models/` is a local folder is a mistyped local path, not a repo to look up.
    """
    path = Path(model_id).expanduser()
    return bool(_HUB_ID.match(model_id)) and not path.exists() and not path.parent.is_dir()


def missing_path_message(model_id: str) -> str:
    """Why `model_id`, which is no local path, was not looked up on the Hub, and what the folder near it holds."""
    path = Path(model_id).expanduser()
    message = f"{model_id} does not exist"
    if path.parent.is_dir():
        near = sorted(p.name for p in path.parent.iterdir() if p.is_dir())[:10]
        message += f" (the folder {path.parent} holds: {', '.join(near) or 'no folders'})"
        if _HUB_ID.match(model_id):
            message += (
                f"; it was not looked up on the Hugging Face Hub, since {path.parent} is a local folder"
            )
    else:
        message += " and is not a Hugging Face Hub id (owner/name)"
    return message


def no_network_message(model_id: str, exc: Exception) -> str:
    return (
        f"{model_id!r} is no local folder, and it could not be downloaded from the Hugging Face Hub "
        f"({type(exc).__name__}: {exc}). "
        f"Without network, copy the checkpoint folder onto this machine and export it from there: "
        f"`python -m export --model /path/to/{model_id.split('/')[-1]} --out models/dia`, then "
        f"`Dia.from_pretrained('models/dia')`"
    )


def download(
    model_id: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    variant: str | None = None,
) -> Path:
    """Fetch a Hub repo into the cache and return its folder; errors say what to do offline.

    From a repo holding an exported folder, with `variant`, only what running it needs: the manifest,
    the codec and that variant's graphs (float32's where the repo has no such variant). Anything
    else (a torch checkpoint, or no `variant`), the whole repo. `HF_HUB_OFFLINE=1` serves from the
    cache; `revision` pins a branch, tag or commit.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = str(cache_root(cache_dir) / "hub")
    try:
        patterns = None
        if variant is not None:
            try:
                manifest = Path(hf_hub_download(model_id, MANIFEST_NAME, revision=revision, cache_dir=hub))
            except EntryNotFoundError:  # a torch checkpoint, or offline with no manifest cached
                pass
            else:
                patterns = [MANIFEST_NAME, *_variant_files(manifest.parent, variant)]
                revision = manifest.parent.name  # the commit the manifest came from, should a branch move
        folder = snapshot_download(model_id, revision=revision, cache_dir=hub, allow_patterns=patterns)
    except RepositoryNotFoundError as exc:
        raise FileNotFoundError(
            f"{model_id!r} is neither a local folder nor a Hugging Face Hub repository"
        ) from exc
    except RevisionNotFoundError as exc:
        raise FileNotFoundError(f"the Hub repository {model_id!r} has no revision {revision!r}") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ConnectionError(no_network_message(model_id, exc)) from exc
    return Path(folder)


def _variant_files(folder: Path, variant: str) -> list[str]:
    """The graph files of `variant` (float32 where the folder has none) and of the codec."""
    manifest = Manifest.load(folder)
    return [entry.path for entry in manifest.files(variant if variant in manifest.variants else "float32")]


def exported_cache_folder(model_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where a torch checkpoint exported on first use is kept."""
    return cache_root(cache_dir) / "exported" / re.sub(r"[^\w.-]+", "--", model_id.strip("/"))


def resolve_model_folder(
    model_id: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    variant: str = "float32",
) -> Path:
    """A folder holding `dia_ort.json`, exporting a torch checkpoint on first use if need be.

    A checkpoint's export holds float32 and `variant`; a folder that was exported already is
    returned as it is (the runtime says what it lacks).
    """
    model_id = str(model_id)
    path = Path(model_id).expanduser()
    if path.exists():
        if (path / MANIFEST_NAME).is_file():
            return path
        if (path / "config.json").is_file():
            return _export_on_first_use(str(path.resolve()), path, cache_dir, variant)
        raise FileNotFoundError(
            f"{path} holds neither {MANIFEST_NAME} (an exported dia-ort model) nor config.json (a Dia checkpoint)"
        )
    if not is_hub_id(model_id):
        raise FileNotFoundError(f"model folder {missing_path_message(model_id)}")
    exported = exported_cache_folder(model_id, cache_dir)
    if variant in _exported_variants(exported):
        return exported
    folder = download(model_id, revision, cache_dir, variant)
    if (folder / MANIFEST_NAME).is_file():
        return folder
    return _export_on_first_use(model_id, folder, cache_dir, variant)


def _exported_variants(folder: Path) -> set[str]:
    """The precision variants of an exported folder; none where it has no readable manifest."""
    try:
        return set(Manifest.load(folder).variants)
    except (FileNotFoundError, ValueError):
        return set()


def _export_on_first_use(
    model_id: str, checkpoint: Path, cache_dir: str | os.PathLike | None, variant: str
) -> Path:
    """Export `checkpoint` into the cache with float32, `variant` and the variants exported before."""
    out = exported_cache_folder(model_id, cache_dir)
    earlier = _exported_variants(out)
    if variant in earlier:
        return out
    dtypes = tuple(sorted({"float32", variant, *earlier}))
    floats = [d for d in dtypes if d not in QUANTIZED_DTYPES]
    quantized = [d for d in dtypes if d in QUANTIZED_DTYPES]
    flags = f"--dtype {' '.join(floats)}" + (f" --quantize {' '.join(quantized)}" if quantized else "")
    command = f"python -m export --model {checkpoint} --out {out} {flags}"
    try:
        (entry,) = entry_points(group=EXPORTER_GROUP, name="checkpoint")
        export_checkpoint = entry.load()
    except (ValueError, ImportError) as exc:  # not registered, or its dependencies are not installed
        raise ValueError(
            f"{checkpoint} is a torch checkpoint, which must be exported to ONNX once. Install the export "
            f"extra (`pip install 'dia-ort[export]'`) to do it automatically, or run: {command}"
        ) from exc
    log.warning(
        "exporting %s %s to ONNX into %s (once; needs the export extra and time)", model_id, dtypes, out
    )
    export_checkpoint(str(checkpoint), out, dtypes)
    return out


def model_family(model: str | os.PathLike) -> str:
    """ "dia2" for a Dia2 folder (exported, or a checkpoint to export on first use) or a Hub repo of
    one, else "dia". Of a Hub repo only its manifest (or assets list, or config) is fetched, into the
    cache that `from_pretrained` downloads to."""
    from dia_ort.dia2_config import ASSETS_NAME, is_dia2_checkpoint

    folder: Path | None = Path(model).expanduser()
    if not folder.exists() and is_hub_id(str(model)):
        folder = _hub_folder(str(model), (MANIFEST_NAME, ASSETS_NAME, "config.json"))
    if folder is None:
        return "dia"
    if (folder / MANIFEST_NAME).is_file():
        return Manifest.load(folder).family
    return "dia2" if is_dia2_checkpoint(folder) else "dia"


def _hub_folder(model_id: str, names: tuple[str, ...]) -> Path | None:
    """The first of `names` a Hub repo holds, fetched into the cache: the folder it is in; None where
    the repo has none of them or is no repo (`from_pretrained` then says so). Offline, or with the Hub
    out of reach, a ConnectionError that says what to do."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    hub = str(cache_root(None) / "hub")
    for name in names:
        try:
            return Path(hf_hub_download(model_id, name, cache_dir=hub)).parent
        except LocalEntryNotFoundError as exc:  # offline, or unreachable, and not in the cache
            raise ConnectionError(no_network_message(model_id, exc)) from exc
        except EntryNotFoundError:  # the repo has no such file
            continue
        except OSError:
            return None
    return None
