"""Release stage: a ``compress`` run folder -> a deployable, verifiable bundle and a deterministic tarball.

``release(run_dir, dist)`` writes ``DIST/<name>/`` and ``DIST/<name>.tar.gz``: the INT8 model (and the FP32
one with ``include_fp32``) with its config and tokenizer, ``manifest.json`` (sha256 and size of every file,
versions, the recipe, the source checkpoint's hash, accuracy and gate results, benchmarks per device with
their environment, nodes kept in float, pruning) and ``MODEL_CARD.md`` generated from the manifest.
``verify_bundle`` re-hashes a bundle folder or tarball against its manifest; ``load_bundle`` verifies first
and then loads the model through the one runtime interface.

Reproducibility: the ONNX files written by ``compress`` were measured byte-identical across rebuilds from the
same checkpoint and recipe (see MODEL_CARD). The stage reports (timings, absolute paths) are left out of the
bundle and ``edgekit.json`` is rewritten without paths, so a bundle holds only reproducible files; the tarball
is written with sorted entries, mtime 0, uid/gid 0 and a gzip header without name or time, so the same
bundle gives the same tarball bytes. The manifest itself carries measured figures (latency) and library
versions: it is identical for the same run folder, not across runs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.artifacts import sha256_file, sha256_stream, staged_output, tree_sha256  # noqa: F401 - re-exported
from edgekit.errors import CheckFailed, EdgekitError
from edgekit.release.manifest import MANIFEST_SCHEMA, build_manifest  # noqa: F401 - MANIFEST_SCHEMA re-exported
from edgekit.reports import Report

MANIFEST = "manifest.json"
MODEL_CARD = "MODEL_CARD.md"
REPORT = "report.json"
VARIANTS = {"int8": "int8", "fp32": "onnx"}  # bundle variant -> folder in the compress run
LEFT_OUT_SUFFIXES = ("_report.json", "_report.md")  # timings and absolute paths: never byte-identical


@dataclass
class ReleaseConfig:
    name: str | None = None  # default: <source checkpoint folder>-int8
    include_fp32: bool = False
    source: str | None = None  # the source checkpoint, when it moved since compress ran
    bench_reports: list[str] = field(default_factory=list)  # `edgekit bench --json` files from other devices
    allow_failed: bool = False  # bundle a run whose accuracy gate failed (marked failed in the manifest)


@dataclass
class ReleaseReport(Report):
    name: str
    bundle: str
    tarball: str
    tarball_sha256: str
    files: int
    manifest: dict


# ---- reading runs, releases and their recipes ---------------------------------------------------------


def _json_in_tar(path: Path) -> dict:
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name == MANIFEST]
            if len(members) != 1:
                raise EdgekitError(f"{path} holds {len(members)} {MANIFEST} files", "point at one release tarball")
            return json.loads(tar.extractfile(members[0]).read().decode("utf-8"))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise EdgekitError(f"{path} is not a readable .tar.gz ({e})", "download the release again") from None


def read_run_json(path) -> tuple[str, dict, Path]:
    """('compress', report) or ('release', manifest) from a report.json, a manifest.json, a run folder, a
    release bundle folder, a DIST folder holding one bundle, or a release .tar.gz."""
    p = Path(path)
    if not p.exists():
        raise EdgekitError(f"{p} does not exist", "point at a compress report.json, a release manifest.json or their folder")
    if p.is_dir():
        found = [f for f in (p / REPORT, p / MANIFEST) if f.is_file()]
        if not found:
            found = sorted(d / MANIFEST for d in p.iterdir() if (d / MANIFEST).is_file())
        if len(found) != 1:
            raise EdgekitError(f"{p} holds {'no' if not found else len(found)} {REPORT}/{MANIFEST} files",
                               "point at a compress output folder, a release bundle, or one of those files")
        p = found[0]
    if p.name.endswith((".tar.gz", ".tgz")):
        data = _json_in_tar(p)
    else:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EdgekitError(f"{p} is not valid JSON ({e})", "point at a report.json or manifest.json written by edgekit") from None
    kind = {"CompressReport": "compress", "ReleaseManifest": "release"}.get(data.get("kind") if isinstance(data, dict) else None)
    if kind is None:
        raise EdgekitError(f"{p} is neither an edgekit compress report nor a release manifest",
                           "point at OUT/report.json from `edgekit compress`, or manifest.json from `edgekit release`")
    return kind, data, p


def recipe_of(path):
    """The resolved recipe recorded by a compress run or a release (for ``--dump-recipe``)."""
    from edgekit.recipe import recipe_from_report, validate_recipe

    if path is None:
        raise EdgekitError("there is no run to read a recipe from", "name a run folder, report or release")
    kind, data, p = read_run_json(path)
    recipe = validate_recipe(data["recipe"], f"the recipe in {p}") if kind == "release" and data.get("recipe") \
        else recipe_from_report(data) if kind == "compress" else None
    if recipe is None:
        raise EdgekitError(f"{p} records no recipe", "it was written by an older edgekit; run compress again")
    return recipe


# ---- building --------------------------------------------------------------------------------------------


def _copy_variant(src: Path, dst: Path) -> None:
    """The model folder without stage reports; edgekit.json kept without paths (they differ per run)."""
    dst.mkdir(parents=True)
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if f.is_dir() or f.name.endswith(LEFT_OUT_SUFFIXES) or f.name.startswith("."):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if f.name == "edgekit.json":
            meta = json.loads(f.read_text(encoding="utf-8"))
            meta = {k: v for k, v in meta.items() if not (isinstance(v, str) and os.path.isabs(v))}
            (dst / rel).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(f, dst / rel)


def _file_table(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST}


def write_deterministic_tar(folder: Path, arcroot: str, dest: Path) -> str:
    """Tar+gzip ``folder`` under ``arcroot/``: sorted entries, mtime 0, uid/gid 0, no gzip name or time."""
    entries = sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix())
    with open(dest, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in [folder, *entries]:
            rel = p.relative_to(folder).as_posix()
            info = tarfile.TarInfo(arcroot if rel == "." else f"{arcroot}/{rel}")
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if p.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = p.stat().st_size, 0o644
                with open(p, "rb") as fh:
                    tar.addfile(info, fh)
    return sha256_file(dest)


def _source_of(report: dict, override: str | None) -> Path:
    src = Path(override or report.get("source") or "")
    if not src.is_dir():
        raise EdgekitError(f"the source checkpoint {src} of this run is not there to hash",
                           "release on the machine that ran compress, or pass --source CHECKPOINT")
    return src


def release(run_dir, dist, config: ReleaseConfig | None = None, overwrite: bool = False) -> ReleaseReport:
    """Bundle a compress run folder into DIST/<name>/ and DIST/<name>.tar.gz, atomically."""
    from edgekit.release.card import model_card

    cfg = config or ReleaseConfig()
    run = Path(run_dir)
    run = run.parent if run.is_file() else run
    if not (run / REPORT).is_file() or not (run / "int8" / "model.onnx").is_file():
        raise EdgekitError(f"{run} is not an `edgekit compress` output folder (report.json, int8/model.onnx)",
                           "pass the folder given to compress with -o")
    kind, report, _ = read_run_json(run / REPORT)
    if kind != "compress":
        raise EdgekitError(f"{run / REPORT} is not a compress report", "pass the folder given to compress with -o")
    if not report.get("passed") and not cfg.allow_failed:
        raise CheckFailed(f"the run in {run} failed its accuracy gate, so it is not released",
                          "fix the run, or pass --allow-failed to bundle it marked as failed")
    source = _source_of(report, cfg.source)
    name = cfg.name or f"{source.name}-int8"
    if not name or "/" in name or name.startswith("."):
        raise EdgekitError(f"'{name}' is not usable as a bundle name", "pass --name with letters, digits, - or _")
    dist = Path(dist).resolve()
    tarball = dist / f"{name}.tar.gz"
    if tarball.exists() and not overwrite:
        raise EdgekitError(f"{tarball} already exists", "choose another -o or --name, or pass --overwrite")
    tmp_tar = dist / f".{name}.tar.gz.{os.getpid()}.partial"  # DIST itself is made by staged_output
    try:
        with staged_output(dist / name, overwrite, protect=(run.resolve(), source.resolve())) as staging:
            variants = ["int8", "fp32"] if cfg.include_fp32 else ["int8"]
            for v in variants:
                _copy_variant(run / VARIANTS[v], staging / v)
            files = _file_table(staging)
            manifest = build_manifest(report, run, source, name, variants, files, cfg)
            card = staging / MODEL_CARD
            card.write_text(model_card(manifest), encoding="utf-8")
            files[MODEL_CARD] = {"sha256": sha256_file(card), "size": card.stat().st_size}  # the rest is hashed
            manifest["files"] = dict(sorted(files.items(), key=lambda kv: Path(kv[0])))  # _file_table's order
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            digest = write_deterministic_tar(staging, name, tmp_tar)
        os.replace(tmp_tar, tarball)
    finally:
        tmp_tar.unlink(missing_ok=True)
    return ReleaseReport(name, str(dist / name), str(tarball), digest, len(manifest["files"]) + 1, manifest)


# ---- verifying and loading ------------------------------------------------------------------------------


@dataclass
class BundleCheck(Report):
    path: str
    name: str
    files_checked: int
    problems: list  # {"problem": tampered|missing|extra, "file": ..., "detail": ...}

    @property
    def passed(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.passed


def _compare(listing: dict, manifest_bytes: bytes | None) -> tuple[list, int]:
    """``listing``: relative path -> callable returning (sha256, size), or a problem string."""
    if manifest_bytes is None:
        return [{"problem": "missing", "file": MANIFEST, "detail": "the bundle has no manifest"}], 0
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
        expected = manifest["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return [{"problem": "tampered", "file": MANIFEST, "detail": "not a readable edgekit manifest"}], 0
    problems = []
    for rel in sorted(set(expected) | set(listing)):
        if rel not in listing:
            problems.append({"problem": "missing", "file": rel, "detail": "listed in the manifest, not in the bundle"})
        elif rel not in expected:
            problems.append({"problem": "extra", "file": rel, "detail": "in the bundle, not in the manifest"})
        elif isinstance(listing[rel], str):
            problems.append({"problem": "extra", "file": rel, "detail": listing[rel]})
        else:
            digest, size = listing[rel]()
            if digest != expected[rel].get("sha256") or size != expected[rel].get("size"):
                problems.append({"problem": "tampered", "file": rel,
                                 "detail": f"sha256 {digest[:12]}… size {size}, manifest says "
                                           f"{str(expected[rel].get('sha256'))[:12]}… size {expected[rel].get('size')}"})
    return problems, len(expected)


def _check_folder(folder: Path) -> BundleCheck:
    listing = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel == MANIFEST or p.is_dir() and not p.is_symlink():
            continue
        listing[rel] = "a link or special file" if p.is_symlink() or not p.is_file() else \
            (lambda p=p: (sha256_file(p), p.stat().st_size))
    mf = folder / MANIFEST
    problems, n = _compare(listing, mf.read_bytes() if mf.is_file() else None)
    return BundleCheck(str(folder), folder.name, n, problems)


def _check_tar(path: Path) -> BundleCheck:
    listing, manifest_bytes, roots = {}, None, set()
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar.getmembers():
                parts = Path(m.name).parts
                if m.name.startswith("/") or ".." in parts or not parts:
                    listing[m.name] = "an unsafe path"
                    continue
                roots.add(parts[0])
                rel = "/".join(parts[1:])
                if m.isdir():
                    continue
                if rel == MANIFEST and m.isfile():
                    manifest_bytes = tar.extractfile(m).read()
                elif not m.isfile():
                    listing[rel or m.name] = "a link or special file"
                else:
                    # hashed now, while the member is at hand, in chunks: never the whole bundle in memory
                    listing[rel] = lambda r=(sha256_stream(tar.extractfile(m)), m.size): r
    except (tarfile.TarError, OSError, EOFError) as e:
        return BundleCheck(str(path), path.name, 0, [{"problem": "tampered", "file": path.name, "detail": f"unreadable ({e})"}])
    problems, n = _compare(listing, manifest_bytes)
    if len(roots) > 1:
        problems.append({"problem": "extra", "file": ", ".join(sorted(roots)), "detail": "more than one top-level folder"})
    return BundleCheck(str(path), next(iter(roots), path.name), n, problems)


def _bundle_folders(p: Path) -> list[Path]:
    """The bundle folders in a DIST folder (or ``p`` itself when it is one)."""
    if (p / MANIFEST).exists():
        return [p]
    return [d for d in sorted(p.iterdir()) if d.is_dir() and (d / MANIFEST).exists() and not d.name.startswith(".")]


def verify_bundle(path) -> list[BundleCheck]:
    """Re-hash a bundle folder, a release tarball, or every bundle and tarball in a DIST folder."""
    p = Path(path)
    if not p.exists():
        raise EdgekitError(f"{p} does not exist", "point at a release bundle folder, its .tar.gz, or the DIST folder")
    if p.is_file():
        return [_check_tar(p)]
    if (p / MANIFEST).exists():
        return [_check_folder(p)]
    targets = _bundle_folders(p) + [f for f in sorted(p.glob("*.tar.gz")) if not f.name.startswith(".")]
    if not targets:
        raise EdgekitError(f"{p} holds no release bundle ({MANIFEST}) and no .tar.gz",
                           "point at the folder written by `edgekit release`")
    return [_check_folder(t) if t.is_dir() else _check_tar(t) for t in targets]


class BundleIntegrityError(CheckFailed):
    """A bundle whose files do not match its manifest (exit 1)."""


def load_bundle(path, variant: str = "int8", device: str = "cpu", threads: int | None = None):
    """Check every hash of a bundle folder, then load its ``variant`` model (``edgekit.runtimes.base.load``)."""
    from edgekit.runtimes.base import load

    p = Path(path)
    if p.is_file():
        raise EdgekitError(f"{p} is a file; load_bundle reads an extracted bundle folder",
                           f"extract it first: tar xzf {p.name}")
    if not p.exists():
        raise EdgekitError(f"{p} does not exist", "point at a release bundle folder")
    folders = _bundle_folders(p)  # only folders are loaded: their tarballs need not be hashed
    if len(folders) != 1:
        raise EdgekitError(f"{p} holds {len(folders)} bundle folders", "point at one bundle folder")
    check = _check_folder(folders[0])
    if not check.passed:
        raise BundleIntegrityError(f"bundle {check.name} does not match its manifest: " + ", ".join(
            f"{x['problem']} {x['file']}" for x in check.problems), "rebuild or download the release again")
    manifest = json.loads((Path(check.path) / MANIFEST).read_text(encoding="utf-8"))
    models = manifest.get("models", {})
    if variant not in models:
        raise EdgekitError(f"bundle {check.name} has no '{variant}' model", f"use one of: {', '.join(models)}")
    model_path = Path(check.path) / models[variant]["path"]
    return load(model_path.parent, device=device, threads=threads, task=manifest.get("task"))
