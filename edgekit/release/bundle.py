"""Release stage: a ``compress`` run folder -> a deployable, verifiable bundle and a deterministic tarball.

``release(run_dir, dist)`` writes ``DIST/<name>/`` and ``DIST/<name>.tar.gz``: the INT8 model (and the FP32
one with ``include_fp32``) with its config and tokenizer, ``manifest.json`` (sha256 and size of every file,
versions, the recipe, the source checkpoint's hash, accuracy and gate results, benchmarks per device with
their environment, nodes kept in float, pruning) and ``MODEL_CARD.md`` generated from the manifest.
``verify_bundle`` re-hashes a bundle folder or tarball against its manifest; ``load_bundle`` verifies first
and then loads the model through the one runtime interface.

Nothing in a bundle is trusted: a tarball with links, devices, absolute or ``..`` paths or duplicate names is
refused (``tarballs.safe_members``), a link in a run or bundle folder is refused rather than followed, the
hashes the manifest states in ``models`` are cross-checked against its file table, a manifest from a newer
edgekit is refused, and a release read as a gate baseline is re-hashed first. The hashes guard against damage;
against someone who can also rewrite the manifest, ``--sign`` adds an Ed25519 signature (``signing``).

Reproducibility: the ONNX files written by ``compress`` were measured byte-identical across rebuilds from the
same checkpoint and recipe (see MODEL_CARD). The stage reports (timings, absolute paths) are left out of the
bundle and ``edgekit.json`` is rewritten without paths, so a bundle holds only reproducible files; the tarball
is written with sorted entries, mtime 0, uid/gid 0 and a gzip header without name or time, so the same
bundle gives the same tarball bytes. The manifest itself carries measured figures (latency) and library
versions: it is identical for the same run folder, not across runs.
"""

from __future__ import annotations

import gzip
import json
import os
import posixpath
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from edgekit.artifacts import sha256_file, sha256_stream, staged_output, tree_sha256  # noqa: F401 - re-exported
from edgekit.errors import CheckFailed, EdgekitError
from edgekit.release.manifest import MANIFEST_SCHEMA, build_manifest, check_schema  # noqa: F401 - MANIFEST_SCHEMA re-exported
from edgekit.release.signing import SIGNATURE, SIGNATURE_FILES, SIGNATURE_INFO
from edgekit.release.tarballs import safe_members
from edgekit.reports import Report

MANIFEST = "manifest.json"
MODEL_CARD = "MODEL_CARD.md"
REPORT = "report.json"
VARIANTS = {"int8": "int8", "fp32": "onnx"}  # bundle variant -> folder in the compress run
LEFT_OUT_SUFFIXES = ("_report.json", "_report.md")  # timings and absolute paths: never byte-identical


@dataclass
class ReleaseConfig:
    name: str | None = None  # default: <source checkpoint folder>-int8 (-int4 for a --bits 4 run)
    include_fp32: bool = False
    source: str | None = None  # the source checkpoint, when it moved since compress ran
    bench_reports: list[str] = field(default_factory=list)  # `edgekit bench --json` files from other devices
    allow_failed: bool = False  # bundle a run whose accuracy gate failed (marked failed in the manifest)
    sign: str | None = None  # an Ed25519 private key (PEM, PKCS8, unencrypted): sign manifest.json with it


@dataclass
class ReleaseReport(Report):
    name: str
    bundle: str
    tarball: str
    tarball_sha256: str
    files: int
    manifest: dict
    signed_by: str | None = None  # sha256 of the signing key's DER public key, when built with --sign


# ---- reading runs, releases and their recipes (tarballs through tarballs.safe_members) -------------------


def _read_tar(path: Path) -> tuple[dict, dict, set]:
    """(relative path -> (sha256, size), {manifest/signature file -> bytes}, top-level folders) of a tarball."""
    listing, special, roots = {}, {}, set()
    with tarfile.open(path, "r:gz") as tar:  # tarfile errors: the caller's (a damaged download is exit 1)
        for m in safe_members(tar, path):
            parts = PurePosixPath(posixpath.normpath(m.name)).parts
            if not parts or parts == (".",):
                continue
            roots.add(parts[0])
            rel = "/".join(parts[1:])
            if m.isdir():
                continue
            if rel in (MANIFEST, *SIGNATURE_FILES):
                special[rel] = tar.extractfile(m).read()
            else:
                # hashed now, while the member is at hand, in chunks: never the whole bundle in memory
                listing[rel or m.name] = (sha256_stream(tar.extractfile(m)), m.size)
    return listing, special, roots


def _json_in_tar(path: Path) -> dict:
    """The manifest of a release tarball, after re-hashing every file against it (a baseline is not trusted)."""
    check, manifest_bytes = _scan_tar(path, unreadable_is_error=True)
    if manifest_bytes is None:
        raise EdgekitError(f"{path} holds no {MANIFEST} at its top folder", "point at a tarball written by `edgekit release`")
    _raise_if_damaged(check)
    return json.loads(manifest_bytes.decode("utf-8"))


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
    if kind == "release":
        check_schema(data, p)
        # A bundle is read only after its files are re-hashed (tarballs: in _json_in_tar). A manifest.json alone
        # (CI downloads only it as the baseline) has nothing beside it to hash: it is read as it is.
        listed = data.get("files") if isinstance(data.get("files"), dict) else {}
        if p.name == MANIFEST and any(isinstance(rel, str) and ".." not in rel.split("/") and not rel.startswith("/")
                                      and (p.parent / rel).exists() for rel in listed):
            _raise_if_damaged(_check_folder(p.parent))
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


def refuse_links(folder: Path, what: str) -> None:
    """Refuse (exit 2, naming it) any symbolic link or special file under ``folder``: following one would ship
    whatever it points at (a file outside the run, or nothing on the machine that extracts the bundle)."""
    for parent, dirs, files in os.walk(folder, followlinks=False):
        for n in sorted(dirs + files):
            p = Path(parent) / n
            if p.is_symlink():
                raise EdgekitError(f"{p} in the {what} is a symbolic link (to {os.readlink(p)}), which edgekit does not "
                                   "follow", "replace it with the file itself, or run the stage again")
            if n in files and not p.is_file():
                raise EdgekitError(f"{p} in the {what} is not a regular file", "remove it, or run the stage again")


def _copy_variant(src: Path, dst: Path) -> None:
    """The model folder without stage reports; edgekit.json kept without paths (they differ per run)."""
    dst.mkdir(parents=True)
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if f.is_symlink():  # refuse_links ran first; this guards a link made since
            raise EdgekitError(f"{f} is a symbolic link, which edgekit does not follow into a bundle",
                               "replace it with the file itself")
        if f.is_dir() or f.name.endswith(LEFT_OUT_SUFFIXES) or f.name.startswith("."):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if f.name == "edgekit.json":
            meta = json.loads(f.read_text(encoding="utf-8"))
            meta = {k: v for k, v in meta.items() if not (isinstance(v, str) and os.path.isabs(v))}
            (dst / rel).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(f, dst / rel, follow_symlinks=False)


def _file_table(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in (MANIFEST, *SIGNATURE_FILES)}


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


def _source_of(report: dict, override: str | None, run: Path | None = None) -> Path:
    """--source, else the checkpoint compress recorded: where it was, else (the run folder moved together with
    it, e.g. a CI job's checkout elsewhere) the same path relative to the run folder."""
    src = Path(override or report.get("source") or "")
    relative = report.get("source_from_output")
    if not override and not src.is_dir() and run is not None and isinstance(relative, str) and relative:
        moved = (run / relative).resolve()
        if moved.is_dir():
            return moved
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
    refuse_links(run, "run folder")
    kind, report, _ = read_run_json(run / REPORT)
    if kind != "compress":
        raise EdgekitError(f"{run / REPORT} is not a compress report", "pass the folder given to compress with -o")
    if not report.get("passed") and not cfg.allow_failed:
        raise CheckFailed(f"the run in {run} failed its accuracy gate, so it is not released",
                          "fix the run, or pass --allow-failed to bundle it marked as failed")
    source = _source_of(report, cfg.source, run)
    name = cfg.name or f"{source.name}-{'int4' if report['quantize'].get('weight_bits') else 'int8'}"
    if not name or "/" in name or name.startswith("."):
        raise EdgekitError(f"'{name}' is not usable as a bundle name", "pass --name with letters, digits, - or _")
    dist = Path(dist).resolve()
    tarball = dist / f"{name}.tar.gz"
    if tarball.exists() and not overwrite:
        raise EdgekitError(f"{tarball} already exists", "choose another -o or --name, or pass --overwrite")
    signing_key = None
    if cfg.sign:
        from edgekit.release.signing import load_private_key

        signing_key = load_private_key(cfg.sign)  # before anything is written: a bad key leaves nothing behind
    signed_by = None
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
            manifest_bytes = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
            (staging / MANIFEST).write_bytes(manifest_bytes)
            if signing_key is not None:
                from edgekit.release.signing import sign_manifest

                signed_by = sign_manifest(signing_key, manifest_bytes, staging)  # Ed25519: deterministic bytes
            digest = write_deterministic_tar(staging, name, tmp_tar)
        os.replace(tmp_tar, tarball)
    finally:
        tmp_tar.unlink(missing_ok=True)
    return ReleaseReport(name, str(dist / name), str(tarball), digest,
                         len(manifest["files"]) + 1 + (len(SIGNATURE_FILES) if signed_by else 0), manifest, signed_by)


# ---- verifying and loading ------------------------------------------------------------------------------


@dataclass
class BundleCheck(Report):
    path: str
    name: str
    files_checked: int
    problems: list  # {"problem": tampered|missing|extra|unsigned|signature, "file": ..., "detail": ...}
    # {"status": valid|invalid|not checked, "public_key_sha256": ...} when signed or a key was given; else None
    signature: dict | None = None

    @property
    def passed(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.passed


def _tampered(detail: str, file: str = MANIFEST) -> dict:
    return {"problem": "tampered", "file": file, "detail": detail}


def _cross_check_models(manifest: dict, expected: dict) -> list[dict]:
    """Every hash the manifest states about the bundle's own files agrees with its file table (which the bytes
    are checked against): a swapped model whose file entry was rewritten still disagrees with ``models``."""
    models = manifest.get("models")
    if not isinstance(models, dict) or not models:
        return [_tampered("the manifest names no models")]
    problems = []
    for var, m in models.items():
        rel = m.get("path") if isinstance(m, dict) else None
        entry = expected.get(rel) if isinstance(rel, str) else None
        weights = m.get("weights") if isinstance(m, dict) else None  # external weights beside the graph
        w_rel = weights.get("path") if isinstance(weights, dict) else None
        w_entry = expected.get(w_rel) if isinstance(w_rel, str) else None
        if entry is None:
            problems.append(_tampered(f"models.{var}.path {rel!r} is not in the manifest's file table"))
        elif weights is not None and w_entry is None:
            problems.append(_tampered(f"models.{var}.weights.path {w_rel!r} is not in the manifest's file table"))
        elif w_entry is not None and (weights.get("sha256") != w_entry.get("sha256")
                                      or weights.get("size_bytes") != w_entry.get("size")):
            problems.append(_tampered(f"models.{var}.weights states sha256 {str(weights.get('sha256'))[:12]}… size "
                                      f"{weights.get('size_bytes')}, the file table {str(w_entry.get('sha256'))[:12]}… "
                                      f"size {w_entry.get('size')}", w_rel))
        elif m.get("sha256") != entry.get("sha256") or \
                m.get("size_bytes") != entry.get("size") + (w_entry.get("size") if w_entry else 0):
            problems.append(_tampered(f"models.{var} states sha256 {str(m.get('sha256'))[:12]}… size {m.get('size_bytes')}, "
                                      f"the file table {str(entry.get('sha256'))[:12]}… size {entry.get('size')}"
                                      + (f" (+ {w_entry.get('size')} of weights)" if w_entry else ""), rel))
    return problems


def _compare(listing: dict, manifest_bytes: bytes | None, where) -> tuple[list, int]:
    """``listing``: relative path -> (sha256, size) or a callable returning them. A manifest from a newer edgekit
    is refused (exit 2): this one cannot know what the newer fields promise."""
    if manifest_bytes is None:
        return [{"problem": "missing", "file": MANIFEST, "detail": "the bundle has no manifest"}], 0
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
        expected = manifest["files"]
        if not isinstance(expected, dict) or not all(isinstance(e, dict) for e in expected.values()):
            raise TypeError("files")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return [_tampered("not a readable edgekit manifest")], 0
    check_schema(manifest, f"the manifest of {where}")
    problems = []
    for rel in sorted(set(expected) | set(listing)):
        if rel not in listing:
            problems.append({"problem": "missing", "file": rel, "detail": "listed in the manifest, not in the bundle"})
        elif rel not in expected:
            problems.append({"problem": "extra", "file": rel, "detail": "in the bundle, not in the manifest"})
        else:
            digest, size = listing[rel]() if callable(listing[rel]) else listing[rel]
            if digest != expected[rel].get("sha256") or size != expected[rel].get("size"):
                problems.append(_tampered(f"sha256 {digest[:12]}… size {size}, manifest says "
                                          f"{str(expected[rel].get('sha256'))[:12]}… size {expected[rel].get('size')}", rel))
    return problems + _cross_check_models(manifest, expected), len(expected)


def _signature_state(public_key, special: dict) -> tuple[dict | None, list]:
    """(signature block, problems): checked when a public key is given, else only reported as present."""
    from edgekit.release.signing import check_signature, fingerprint

    sig, info = special.get(SIGNATURE), special.get(SIGNATURE_INFO)
    if public_key is None:
        return ({"status": "not checked", "public_key_sha256": None} if sig is not None else None), []
    if special.get(MANIFEST) is None:
        return None, []  # already a problem: there is nothing to check the signature over
    problem = check_signature(public_key, special[MANIFEST], sig, info)
    return {"status": "invalid" if problem else "valid", "public_key_sha256": fingerprint(public_key)}, \
        [problem] if problem else []


def _check_folder(folder: Path, public_key=None) -> BundleCheck:
    refuse_links(folder, "bundle")  # a link in a bundle folder would be read through: what is checked is elsewhere
    listing, special = {}, {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir():
            continue
        if rel in (MANIFEST, *SIGNATURE_FILES):
            special[rel] = p.read_bytes()
        else:
            listing[rel] = lambda p=p: (sha256_file(p), p.stat().st_size)
    problems, n = _compare(listing, special.get(MANIFEST), folder)
    signature, sig_problems = _signature_state(public_key, special)
    return BundleCheck(str(folder), folder.name, n, problems + sig_problems, signature)


def _scan_tar(path: Path, public_key=None, unreadable_is_error: bool = False) -> tuple[BundleCheck, bytes | None]:
    """The check of a release tarball, and its manifest's bytes (None when it has none). An unreadable file is
    a failed check (a damaged download), or with ``unreadable_is_error`` a user error (not a tarball at all)."""
    try:
        listing, special, roots = _read_tar(path)
    except (tarfile.TarError, OSError, EOFError) as e:
        if unreadable_is_error:
            raise EdgekitError(f"{path} is not a readable .tar.gz ({e})", "download the release again") from None
        return BundleCheck(str(path), path.name, 0, [_tampered(f"unreadable ({e})", path.name)]), None
    problems, n = _compare(listing, special.get(MANIFEST), path)
    if len(roots) > 1:
        problems.append({"problem": "extra", "file": ", ".join(sorted(roots)), "detail": "more than one top-level folder"})
    signature, sig_problems = _signature_state(public_key, special)
    return BundleCheck(str(path), next(iter(roots), path.name), n, problems + sig_problems, signature), special.get(MANIFEST)


def _check_tar(path: Path, public_key=None) -> BundleCheck:
    return _scan_tar(path, public_key)[0]


def _raise_if_damaged(check: BundleCheck) -> None:
    if not check.passed:
        raise BundleIntegrityError(f"bundle {check.path} does not match its manifest: " + ", ".join(
            f"{x['problem']} {x['file']}" for x in check.problems), "rebuild or download the release again")


def _bundle_folders(p: Path) -> list[Path]:
    """The bundle folders in a DIST folder (or ``p`` itself when it is one)."""
    if (p / MANIFEST).exists():
        return [p]
    return [d for d in sorted(p.iterdir()) if d.is_dir() and (d / MANIFEST).exists() and not d.name.startswith(".")]


def verify_bundle(path, public_key=None) -> list[BundleCheck]:
    """Re-hash a bundle folder, a release tarball, or every bundle and tarball in a DIST folder; with
    ``public_key`` (a PEM file) also check each bundle's Ed25519 signature over its manifest."""
    p = Path(path)
    if not p.exists():
        raise EdgekitError(f"{p} does not exist", "point at a release bundle folder, its .tar.gz, or the DIST folder")
    key = None
    if public_key is not None:
        from edgekit.release.signing import load_public_key

        key = load_public_key(public_key)
    if p.is_file():
        return [_check_tar(p, key)]
    if (p / MANIFEST).exists():
        return [_check_folder(p, key)]
    targets = _bundle_folders(p) + [f for f in sorted(p.glob("*.tar.gz")) if not f.name.startswith(".")]
    if not targets:
        raise EdgekitError(f"{p} holds no release bundle ({MANIFEST}) and no .tar.gz",
                           "point at the folder written by `edgekit release`")
    return [_check_folder(t, key) if t.is_dir() else _check_tar(t, key) for t in targets]


class BundleIntegrityError(CheckFailed):
    """A bundle whose files do not match its manifest (exit 1)."""


def checked_bundle(path: Path, stack, why: str, hint: str = "download the release again",
                   public_key=None) -> tuple[Path, BundleCheck]:
    """A bundle folder, or the bundle folder of a release tarball extracted into scratch space removed when
    ``stack`` (an ExitStack) closes, with its files hashed against its manifest (and with ``public_key`` its
    signature checked): what is used is what was verified, as extracted. A mismatch raises BundleIntegrityError.
    ``why`` ends the sentence of an extraction failure ("to time its model"), ``hint`` is its fix."""
    from edgekit.artifacts import scratch_dir

    key = None
    if public_key is not None:
        from edgekit.release.signing import load_public_key

        key = load_public_key(public_key)
    if path.is_dir():
        folder, what = path, f"bundle {path}"
    else:
        dest = stack.enter_context(scratch_dir("edgekit-bundle-"))
        try:
            with tarfile.open(path, "r:gz") as tar:
                tar.extractall(dest, members=safe_members(tar, path), filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise EdgekitError(f"{path} could not be extracted {why} ({e})", hint) from None
        roots = [d for d in dest.iterdir() if (d / MANIFEST).is_file()]
        if len(roots) != 1:
            raise EdgekitError(f"{path} holds {len(roots)} bundle folders",
                               "point at a tarball written by `edgekit release`")
        folder, what = roots[0], f"the bundle extracted from {path}"
    check = _check_folder(folder, key)
    if not check:
        raise BundleIntegrityError(f"{what} does not match its manifest: " + ", ".join(
            f"{x['problem']} {x['file']}" for x in check.problems), "download the release again")
    return folder, check


def load_bundle(path, variant: str = "int8", device: str = "cpu", threads: int | None = None, public_key=None):
    """Check every hash of a bundle folder (and, with ``public_key``, its signature), then load its ``variant``
    model (``edgekit.runtimes.base.load``)."""
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
    key = None
    if public_key is not None:
        from edgekit.release.signing import load_public_key

        key = load_public_key(public_key)
    check = _check_folder(folders[0], key)
    _raise_if_damaged(check)
    manifest = json.loads((Path(check.path) / MANIFEST).read_text(encoding="utf-8"))
    models = manifest.get("models", {})
    if variant not in models:
        raise EdgekitError(f"bundle {check.name} has no '{variant}' model", f"use one of: {', '.join(models)}")
    model_path = Path(check.path) / models[variant]["path"]
    return load(model_path.parent, device=device, threads=threads, task=manifest.get("task"))
