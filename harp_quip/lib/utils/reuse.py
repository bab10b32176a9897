"""--skip_done: reuse an output when nothing it depends on changed.

A stage (hfize_llama, eval_ppl, eval_zeroshot) records its `request` in its JSON
(export_log.json, the --output file): every flag that affects the result plus a
fingerprint of its input files (name, size and modification time of each file of the
quantized folder, export or HF directory, of the GGUF file; a hub id by name). With
--skip_done, an existing output whose request equals the current one is kept instead of
computed again, so a rerun of a script redoes only the stages whose inputs or flags
changed (a layer redone or a new export writes new files, so what follows runs again).
"""
import json
from pathlib import Path

import glog

from lib.utils.io import read_json
from lib.utils.model_loading import resolve_model_source


def files_fingerprint(paths) -> dict:
    """{name: [size, modification time in ns]} of the files."""
    return {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in sorted(paths)}


def folder_fingerprint(folder) -> dict:
    """The fingerprint of the files directly in `folder`."""
    return files_fingerprint(path for path in Path(folder).iterdir() if path.is_file())


def model_fingerprint(hf_path: str) -> dict:
    """What identifies a model's weights on disk (see the module docstring)."""
    source = resolve_model_source(hf_path)
    if source["kind"] == "hub":
        return {"hub": source["repo"]}
    if source["kind"] == "gguf":
        return {"files": files_fingerprint([Path(source["path"]) / source["gguf_file"]])}
    return {"files": folder_fingerprint(source["path"])}


def as_json(value):
    """`value` as it reads back from a JSON file (tuples become lists, ...)."""
    return json.loads(json.dumps(value))


def finished_output(output, request: dict) -> dict | None:
    """The JSON at `output` when it was written for exactly `request`, else None."""
    if output is None or not Path(output).is_file():
        return None
    try:
        previous = read_json(output)
    except ValueError:
        return None
    if not isinstance(previous, dict) or previous.get("request") != as_json(request):
        glog.info(f"{output} exists but was made from other inputs or flags: redoing it")
        return None
    glog.info(f"{output} is up to date (same input files and flags): kept")
    return previous
