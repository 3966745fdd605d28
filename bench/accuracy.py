"""How closely quantized steps follow float32 (export/quant_accuracy.py), and the bytes each one reads.

Run as `python -m bench.accuracy FOLDER --steps N --out FILE` with any of:
- `--variants int8 int4`: the variants exported in FOLDER;
- `--recipes int4 int4-plain`: FOLDER's float32 step quantized by these `export.quantize.RECIPES`;
- `--sweep`: the sensitivity sweep the int4 recipe was chosen by: plain int4, then int4 with one
  MatMul kind at 8 bits (each kind in turn), then int4 with one layer at 8 bits (each layer in turn).
Recipes are quantized into a scratch folder; FOLDER is never written to.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from bench.roofline import step_weight_bytes
from dia_ort.manifest import FileEntry, GraphEntry, Manifest
from export.quant_accuracy import quantization_accuracy
from export.quantize import RECIPES, Recipe, quantize_graph

LAYER_KINDS = ("qkv", "o", "cross_q", "cross_o", "gate_up", "down")  # the kinds each layer of Dia's step has


def sweep(layers: int) -> dict[str, Recipe]:
    """Plain int4, then one kind at a time at 8 bits, then one layer at a time at 8 bits."""
    plain = RECIPES["int4-plain"]
    recipes = {"int4-plain": plain}
    recipes |= {f"int4 + {kind} int8": replace(plain, int8=(kind,)) for kind in LAYER_KINDS}
    recipes |= {"int4 + head int8": replace(plain, int8=("head",), float32=())}
    for layer in range(layers):
        recipes[f"int4 + layer {layer} int8"] = replace(
            plain, int8=tuple(f"{k}@{layer}" for k in LAYER_KINDS)
        )
    return recipes


def _absolute(graph: GraphEntry, folder: Path) -> GraphEntry:
    """The entry with its files named by absolute path, to be listed in another folder's manifest."""

    def absolute(entry: FileEntry) -> FileEntry:
        return replace(entry, path=str((folder / entry.path).resolve()))

    return replace(graph, file=absolute(graph.file), data_files=tuple(map(absolute, graph.data_files)))


def with_recipes(folder: Path, recipes: dict[str, Recipe], scratch: Path) -> Path:
    """`scratch` with a manifest of FOLDER's graphs (by absolute path) and, as variants, FOLDER's
    float32 step quantized by each recipe."""
    manifest = Manifest.load(folder)
    float32 = {name: _absolute(graph, folder) for name, graph in manifest.variants["float32"].items()}
    variants = {"float32": float32}
    for index, (name, recipe) in enumerate(recipes.items()):
        step = quantize_graph(Path(float32["decoder_step"].file.path), scratch, f"recipe{index}", recipe)
        variants[name] = {"encoder": float32["encoder"], "decoder_step": step}
    codec = {name: _absolute(graph, folder) for name, graph in manifest.codec.items()}
    replace(manifest, variants=variants, codec=codec).save(scratch)
    return scratch


def measure(folder: Path, names: list[str], steps: int, recipes: dict[str, Recipe]) -> list[dict]:
    manifest = Manifest.load(folder)
    rows = []
    for name in names:
        accuracy = quantization_accuracy(folder, name, steps=steps)
        step = folder / manifest.variants[name]["decoder_step"].file.path
        recipe = asdict(recipes[name]) if name in recipes else None
        rows.append(
            {"variant": name, **asdict(accuracy), "step_bytes": step_weight_bytes(step), "recipe": recipe}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--variants", nargs="+", default=[], help="exported variants of FOLDER")
    parser.add_argument("--recipes", nargs="+", default=[], choices=sorted(RECIPES))
    parser.add_argument("--sweep", action="store_true", help="the per-kind and per-layer int4 sweep")
    parser.add_argument("--steps", type=int, required=True, help="teacher-forced decoder steps")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = measure(args.folder, args.variants, args.steps, {})
    recipes = {name: RECIPES[name] for name in args.recipes}
    if args.sweep:
        recipes |= sweep(Manifest.load(args.folder).model.decoder_layers)
    if recipes:
        with tempfile.TemporaryDirectory(prefix="dia-recipes-") as scratch:
            folder = with_recipes(args.folder, recipes, Path(scratch))
            rows += measure(folder, list(recipes), args.steps, recipes)
    args.out.write_text(json.dumps({"accuracy": rows}, indent=1))


if __name__ == "__main__":
    main()
