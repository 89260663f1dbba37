"""Bundles that could extract differently from what was verified are refused; every hash the manifest states is
cross-checked; gate baselines are re-hashed; manifests from a newer edgekit are refused; Ed25519 signing; the
static-mode release; gate baselines with wrong-typed fields (issue 14, deliverables 3 and 5)."""

import io
import json
import shutil
import tarfile

import pytest

from conftest import tree_digest
from helpers import assert_user_error, read_json, run_cli


# ---- fixtures: one run, an unsigned and a signed bundle, keys -------------------------------------------


@pytest.fixture(scope="module")
def run(text_ckpt, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hardening") / "run"
    run_cli("compress", text_ckpt, "-o", out, "--data", data_dir / "eval.tsv", "--no-bench")
    return out


def _write_key(path, key, password=None):
    from cryptography.hazmat.primitives import serialization as s

    enc = s.BestAvailableEncryption(password) if password else s.NoEncryption()
    path.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, enc))
    return path


def _write_public(path, key):
    from cryptography.hazmat.primitives import serialization as s

    path.write_bytes(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    d = tmp_path_factory.mktemp("keys")
    signer, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (d / "garbage.pem").write_text("not a key\n")
    return {
        "private": _write_key(d / "signer.pem", signer),
        "public": _write_public(d / "signer.pub.pem", signer),
        "other_public": _write_public(d / "other.pub.pem", other),
        "encrypted": _write_key(d / "encrypted.pem", signer, b"secret"),
        "rsa": _write_key(d / "rsa.pem", rsa_key),
        "rsa_public": _write_public(d / "rsa.pub.pem", rsa_key),
        "garbage": d / "garbage.pem",
    }


@pytest.fixture(scope="module")
def dist(run, keys, tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    run_cli("release", "build", run, "-o", d, "--name", "clf")
    r = run_cli("release", "build", run, "-o", d, "--name", "signed", "--sign", keys["private"])
    assert "Signed: manifest.json.sig" in r.output
    return d


def _snapshot(*folders) -> dict:
    """Every file (name and bytes) under the folders: proof that nothing was changed or left behind."""
    return {str(f): tree_digest(f) for f in folders}


def _rewrite_manifest(bundle, edit):
    m = read_json(bundle / "manifest.json")
    edit(m)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


def _retar(bundle, dest):
    from edgekit.release.bundle import write_deterministic_tar

    write_deterministic_tar(bundle, bundle.name, dest)
    return dest


# ---- tarballs that would extract to something other than what is verified -----------------------------


def _member(name, **kw):
    info = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def _evil_member(how):
    """(TarInfo, bytes or None, the fragment the refusal must name)."""
    data = b"shadow\n"
    if how == "symlink":
        return _member("clf/int8/vocab.txt.link", type=tarfile.SYMTYPE, linkname="/etc/passwd"), None, \
            "'clf/int8/vocab.txt.link', a symbolic link to '/etc/passwd'"
    if how == "hardlink":
        return _member("clf/int8/hard.txt", type=tarfile.LNKTYPE, linkname="clf/int8/vocab.txt"), None, \
            "'clf/int8/hard.txt', a hard link"
    if how == "fifo":
        return _member("clf/int8/pipe", type=tarfile.FIFOTYPE), None, "'clf/int8/pipe', a fifo"
    if how == "device":
        return _member("clf/int8/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3), None, "'clf/int8/null', a device"
    if how == "absolute":
        return _member("/tmp/edgekit-evil.txt", size=len(data)), data, "'/tmp/edgekit-evil.txt' with an absolute path"
    if how == "dotdot":
        return _member("clf/../../evil.txt", size=len(data)), data, "'clf/../../evil.txt' with a '..' component"
    if how == "duplicate":
        return _member("clf/int8/config.json", size=len(data)), data, "'clf/int8/config.json' twice"
    if how == "case-duplicate":
        return _member("clf/INT8/config.json", size=len(data)), data, "'clf/INT8/config.json' twice"
    # the case: a symlink and a file of one name, the symlink last: `tar x` leaves the link
    return _member("clf/int8/tokenizer.json", type=tarfile.SYMTYPE, linkname="../../../outside"), None, \
        "'clf/int8/tokenizer.json', a symbolic link"


EVIL = ["symlink", "hardlink", "fifo", "device", "absolute", "dotdot", "duplicate", "case-duplicate", "shadowing-link"]


def _evil_tarball(dist, dest, how):
    """The real bundle's members, plus one hostile member (appended: tar would apply it last)."""
    info, data, fragment = _evil_member(how)
    with tarfile.open(dist / "clf.tar.gz") as src, tarfile.open(dest, "w:gz", format=tarfile.PAX_FORMAT) as out:
        for m in src.getmembers():
            out.addfile(m, src.extractfile(m) if m.isfile() else None)
        out.addfile(info, io.BytesIO(data) if data is not None else None)
    return dest, fragment


@pytest.mark.parametrize("how", EVIL)
def test_hostile_tarball_is_refused_everywhere_it_is_read(dist, run, tmp_path, how):
    (tmp_path / "in").mkdir()
    tarball, fragment = _evil_tarball(dist, tmp_path / "in" / "clf.tar.gz", how)
    before = _snapshot(tmp_path, run)
    for args in (("release", "verify", tarball), ("gate", run, "--baseline", tarball),
                 ("release", "verify", tarball, "--dump-recipe")):
        line = assert_user_error(run_cli(*args, expect=2), str(tarball), fragment)
        assert "rebuild it with `edgekit release build`" in line
        assert _snapshot(tmp_path, run) == before  # the tarball byte-identical, nothing written anywhere
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["clf.tar.gz", "in"]


def test_tarball_filter_of_python_agrees(dist, tmp_path):
    """The members refused above are refused by tarfile's own data filter too, where it has an opinion."""
    for how in ("symlink", "fifo", "device", "dotdot"):
        info, _, _ = _evil_member(how)
        with pytest.raises(tarfile.FilterError):
            tarfile.data_filter(info, str(tmp_path))
    # an absolute name the filter quietly makes relative (as GNU tar does): refusing it is edgekit's own check
    info, _, _ = _evil_member("absolute")
    assert tarfile.data_filter(info, str(tmp_path)).name == "tmp/edgekit-evil.txt"


def test_intact_tarball_members_pass_the_checks(dist):
    from edgekit.release.bundle import safe_members

    with tarfile.open(dist / "clf.tar.gz") as tar:
        names = [m.name for m in safe_members(tar, dist / "clf.tar.gz")]
    assert "clf/manifest.json" in names and "clf/int8/model.onnx" in names


# ---- symlinks are never followed into a bundle -----------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "folder", "report"])
def test_symlink_in_run_folder_is_refused(run, tmp_path, where):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE\n")
    copy = shutil.copytree(run, tmp_path / "run")
    if where == "file":
        link = copy / "int8" / "vocab.txt"
        link.unlink()
        link.symlink_to(secret / "id_rsa")
    elif where == "folder":
        link = copy / "int8" / "extra"
        link.symlink_to(secret, target_is_directory=True)
    else:
        link = copy / "report.json"
        shutil.move(link, secret / "report.json")
        link.symlink_to(secret / "report.json")
    before = _snapshot(copy, secret)
    line = assert_user_error(run_cli("release", "build", copy, "-o", tmp_path / "dist", "--name", "x", expect=2),
                             str(link), "is a symbolic link", "does not follow")
    assert "PRIVATE" not in line
    assert _snapshot(copy, secret) == before and not (tmp_path / "dist").exists()


def test_symlink_side_file_is_not_copied_by_quantize(text_onnx, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("PRIVATE\n")
    onnx = shutil.copytree(text_onnx, tmp_path / "onnx")
    link = onnx / "tokenizer.json"
    link.unlink()
    link.symlink_to(secret)
    before = _snapshot(onnx)
    assert_user_error(run_cli("quantize", onnx, "-o", tmp_path / "int8", expect=2), str(link), "is a symbolic link")
    assert _snapshot(onnx) == before and secret.read_text() == "PRIVATE\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "secret.txt"]  # no int8/, no .partial


def test_symlink_in_bundle_folder_is_refused(dist, tmp_path):
    bundle = shutil.copytree(dist / "clf", tmp_path / "clf")
    link = bundle / "int8" / "config.json"
    real = tmp_path / "config.json"
    shutil.move(link, real)  # same bytes, so hashing through the link would pass
    link.symlink_to(real)
    before = _snapshot(tmp_path)
    assert_user_error(run_cli("release", "verify", bundle, expect=2), str(link), "is a symbolic link")
    assert_user_error(run_cli("gate", bundle, "--baseline", dist / "clf", expect=2), str(link), "symbolic link")
    assert _snapshot(tmp_path) == before


# ---- every hash the manifest states ----------------------------------------------------------------------


def _swap_model(bundle):
    """Replace int8/model.onnx and rewrite its file-table entry consistently (the models block is left)."""
    from edgekit.artifacts import sha256_file

    model = bundle / "int8" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))

    def rewrite(m):
        m["files"]["int8/model.onnx"] = {"sha256": sha256_file(model), "size": model.stat().st_size}

    _rewrite_manifest(bundle, rewrite)


def test_swapped_model_with_rewritten_file_entry_fails(dist, tmp_path):
    from edgekit.release.bundle import BundleIntegrityError, load_bundle

    bundle = shutil.copytree(dist / "clf", tmp_path / "clf")
    _swap_model(bundle)
    for target in (bundle, _retar(bundle, tmp_path / "clf.tar.gz")):
        r = run_cli("release", "verify", target, expect=1)
        line = next(x for x in r.output.splitlines() if "int8/model.onnx" in x)
        assert "tampered" in line and "models.int8 states sha256" in line, r.output
    with pytest.raises(BundleIntegrityError, match="int8/model.onnx"):
        load_bundle(bundle)


def test_models_path_outside_the_file_table_fails(dist, tmp_path):
    bundle = shutil.copytree(dist / "clf", tmp_path / "clf")

    def elsewhere(m):
        m["models"]["int8"]["path"] = "../../elsewhere/model.onnx"

    _rewrite_manifest(bundle, elsewhere)
    r = run_cli("release", "verify", bundle, expect=1)
    assert "models.int8.path '../../elsewhere/model.onnx' is not in the manifest's file table" in r.output


# ---- gate baselines are re-hashed, not trusted -----------------------------------------------------------


def test_gate_rehashes_a_tarball_baseline(dist, run, tmp_path):
    run_cli("gate", run, "--baseline", dist / "clf.tar.gz", "--no-rebench")  # intact: passes (latency: not this test)
    bundle = shutil.copytree(dist / "clf", tmp_path / "clf")
    model = bundle / "int8" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-10])  # the manifest still promises the old figures
    tarball = _retar(bundle, tmp_path / "clf.tar.gz")
    before = _snapshot(tmp_path, run)
    for baseline in (tarball, bundle, bundle / "manifest.json"):
        r = run_cli("gate", run, "--baseline", baseline, "--junit", tmp_path / "out" / "g.xml", expect=1)
        assert "Traceback" not in r.output
        line = next(x for x in r.output.splitlines() if x.startswith("Error: "))
        assert "does not match its manifest" in line and "tampered int8/model.onnx" in line, r.output
        assert _snapshot(tmp_path, run) == before and not (tmp_path / "out").exists()


def test_gate_reads_a_lone_manifest_as_it_is(dist, run, tmp_path):
    """CI downloads only manifest.json as the baseline (README): there is nothing beside it to re-hash."""
    lone = tmp_path / "baseline"
    lone.mkdir()
    shutil.copy(dist / "clf" / "manifest.json", lone / "manifest.json")
    run_cli("gate", run, "--baseline", lone / "manifest.json")


# ---- manifests from a newer edgekit ----------------------------------------------------------------------


def test_future_schema_version_is_refused(dist, run, tmp_path):
    from edgekit.release.manifest import MANIFEST_SCHEMA

    bundle = shutil.copytree(dist / "clf", tmp_path / "clf")

    def future(m):
        m["schema_version"] = MANIFEST_SCHEMA + 1

    _rewrite_manifest(bundle, future)
    tarball = _retar(bundle, tmp_path / "clf.tar.gz")
    before = _snapshot(tmp_path)
    for args in (("release", "verify", bundle), ("release", "verify", tarball), ("gate", run, "--baseline", bundle),
                 ("gate", run, "--baseline", tarball), ("release", "verify", tarball, "--dump-recipe")):
        assert_user_error(run_cli(*args, expect=2), f"schema_version {MANIFEST_SCHEMA + 1}", "upgrade edgekit")
    assert _snapshot(tmp_path) == before


# ---- signing --------------------------------------------------------------------------------------------


def test_signed_bundle_verifies_with_its_key(dist, keys):
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    for target in (dist / "signed", dist / "signed.tar.gz"):
        r = run_cli("release", "verify", target, "--public-key", keys["public"], "--json")
        rep = json.loads(r.stdout)
        assert rep["passed"] and rep["bundles"][0]["signature"]["status"] == "valid"
    r = run_cli("release", "verify", dist / "signed")
    assert "signature not checked: pass --public-key" in r.output
    # a plain detached Ed25519 signature over the manifest's exact bytes: checkable without edgekit
    bundle = dist / "signed"
    load_pem_public_key(keys["public"].read_bytes()).verify((bundle / "manifest.json.sig").read_bytes(),
                                                            (bundle / "manifest.json").read_bytes())
    info = read_json(bundle / "manifest.json.sig.json")
    assert info["algorithm"] == "Ed25519" and len(info["public_key_sha256"]) == 64
    assert "manifest.json.sig" not in read_json(bundle / "manifest.json")["files"]


def test_signed_tarball_is_deterministic(run, dist, keys, tmp_path):
    run_cli("release", "build", run, "-o", tmp_path, "--name", "signed", "--sign", keys["private"])
    assert (tmp_path / "signed.tar.gz").read_bytes() == (dist / "signed.tar.gz").read_bytes()


def test_wrong_key_fails(dist, keys):
    for target in (dist / "signed", dist / "signed.tar.gz"):
        r = run_cli("release", "verify", target, "--public-key", keys["other_public"], expect=1)
        line = next(x for x in r.output.splitlines() if "manifest.json.sig" in x)
        assert "signature" in line and "not signed by the given key" in line


def test_missing_signature_fails_when_a_key_is_given(dist, keys, tmp_path):
    r = run_cli("release", "verify", dist / "clf", "--public-key", keys["public"], expect=1)
    assert any("unsigned" in x and "built without --sign" in x for x in r.output.splitlines())
    bundle = shutil.copytree(dist / "signed", tmp_path / "signed")  # a signed bundle with its signature removed
    (bundle / "manifest.json.sig").unlink()
    run_cli("release", "verify", bundle, expect=0)  # the hashes still match
    run_cli("release", "verify", bundle, "--public-key", keys["public"], expect=1)


def test_changed_manifest_fails_the_signature(dist, keys, tmp_path):
    bundle = shutil.copytree(dist / "signed", tmp_path / "signed")

    def edit(m):
        m["passed"] = not m["passed"]

    _rewrite_manifest(bundle, edit)
    run_cli("release", "verify", bundle)  # the file table still matches: only the signature can tell
    for target in (bundle, _retar(bundle, tmp_path / "signed.tar.gz")):
        r = run_cli("release", "verify", target, "--public-key", keys["public"], expect=1)
        assert "does not match manifest.json" in r.output
    # a swapped model with the file table AND the models block rewritten: consistent, but not signed
    bundle2 = shutil.copytree(dist / "signed", tmp_path / "signed2")
    _swap_model(bundle2)

    def models_too(m):
        m["models"]["int8"].update(sha256=m["files"]["int8/model.onnx"]["sha256"], size_bytes=m["files"]["int8/model.onnx"]["size"])

    _rewrite_manifest(bundle2, models_too)
    run_cli("release", "verify", bundle2)
    run_cli("release", "verify", bundle2, "--public-key", keys["public"], expect=1)


@pytest.mark.parametrize("key,fragment", [("encrypted", "is encrypted with a passphrase"),
                                          ("rsa", "is not an Ed25519 key (it is RSA)"),
                                          ("public", "it is a public key; --sign takes the private key"),
                                          ("garbage", "is not a readable PEM private key"),
                                          ("missing", "is not a file")])
def test_bad_signing_key_is_refused(run, keys, tmp_path, key, fragment):
    path = keys.get(key, tmp_path / "nokey.pem")
    before = _snapshot(run, path.parent) if path.exists() else _snapshot(run)
    assert_user_error(run_cli("release", "build", run, "-o", tmp_path / "dist", "--sign", path, expect=2),
                      str(path), fragment)
    assert (_snapshot(run, path.parent) if path.exists() else _snapshot(run)) == before
    assert not (tmp_path / "dist").exists()


@pytest.mark.parametrize("key,fragment", [("private", "it is a private key: pass its public half"),
                                          ("rsa_public", "is not an Ed25519 key (it is RSA)"),
                                          ("garbage", "is not a readable PEM public key")])
def test_bad_public_key_is_refused(dist, keys, key, fragment):
    before = _snapshot(dist)
    assert_user_error(run_cli("release", "verify", dist / "signed", "--public-key", keys[key], expect=2),
                      str(keys[key]), fragment)
    assert _snapshot(dist) == before


# ---- the static-mode release (release_card.py joined a list of dicts) ------------------------------------


def test_static_mode_run_is_released_and_verifies(text_ckpt, data_dir, tmp_path):
    run_cli("compress", text_ckpt, "-o", tmp_path / "run", "--mode", "static", "--calibration-data",
            data_dir / "calib.tsv", "--data", data_dir / "eval.tsv", "--no-bench")
    report = read_json(tmp_path / "run" / "report.json")
    floats = report["quantize"]["nodes_in_float"]
    assert report["quantize"]["mode"] == "static" and floats and isinstance(floats[0], dict)
    r = run_cli("release", "build", tmp_path / "run", "-o", tmp_path / "dist", "--name", "static", "--allow-failed")
    assert "Tarball:" in r.output
    card = (tmp_path / "dist" / "static" / "MODEL_CARD.md").read_text()
    assert f"`{floats[0]['name']}` ({floats[0]['op_type']})" in card and "INT8 (static)" in card
    assert read_json(tmp_path / "dist" / "static" / "manifest.json")["quantization"]["mode"] == "static"
    for target in (tmp_path / "dist" / "static", tmp_path / "dist" / "static.tar.gz"):
        assert "OK:" in run_cli("release", "verify", target).output


# ---- gate baselines whose fields have the wrong types -----------------------------------------------------


def _set(path, value):
    def edit(d):
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value
    return edit


BENCH = {"environment": {}, "variants": [{"name": "INT8", "latency": {"p50_ms": "1.2"}}]}
WRONG_TYPES = [
    (("verify", "candidate_metrics", "accuracy"), "95", "the field verify.candidate_metrics.accuracy", "a string '95'"),
    (("verify", "candidate_metrics", "accuracy"), float("nan"), "verify.candidate_metrics.accuracy", "not a finite number"),
    (("verify", "candidate_metrics"), [95], "the field verify.candidate_metrics", "not an object"),
    (("verify",), "passed", "the field verify", "not an object"),
    (("quantize", "size_after"), "big", "the field quantize.size_after", "not a whole number"),
    (("quantize", "size_after"), 1.5, "quantize.size_after", "not a whole number"),
    (("config",), [1], "the field config", "not an object"),
    (("task",), ["text-classification"], "the field task", "not a string"),
    (("bench",), BENCH, "the field bench.variants.0.latency.p50_ms", "not a finite number"),
    (("bench",), {"variants": {"INT8": 1}}, "the field bench.variants", "not a list"),
]


@pytest.mark.parametrize("path,value,fragment,found", WRONG_TYPES, ids=[".".join(w[0]) + f"={w[1]!r}" for w in WRONG_TYPES])
def test_gate_baseline_with_wrong_types_is_refused(run, tmp_path, path, value, fragment, found):
    rep = read_json(run / "report.json")
    _set(path, value)(rep)
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(rep))
    before = _snapshot(tmp_path, run)
    assert_user_error(run_cli("gate", run, "--baseline", baseline, "--junit", tmp_path / "g.xml", expect=2),
                      fragment, found, str(baseline))
    assert_user_error(run_cli("gate", baseline, "--baseline", run, expect=2), fragment)  # either side
    assert _snapshot(tmp_path, run) == before and not (tmp_path / "g.xml").exists()


def test_release_baseline_with_wrong_types_is_refused(dist, run, tmp_path):
    bundle = shutil.copytree(dist / "clf", tmp_path / "clf")
    # the manifest is not in its own file table, so the re-hash passes: the types are checked next
    _rewrite_manifest(bundle, _set(("accuracy", "candidate_metrics", "accuracy"), "95 %"))
    before = _snapshot(tmp_path)
    assert_user_error(run_cli("gate", run, "--baseline", bundle, expect=2), "the field accuracy.candidate_metrics.accuracy",
                      "a string '95 %', not a finite number")
    assert _snapshot(tmp_path) == before
    _rewrite_manifest(bundle, _set(("bench",), {"variants": []}))
    before = _snapshot(tmp_path)
    assert_user_error(run_cli("gate", run, "--baseline", bundle / "manifest.json", expect=2), "the field bench",
                      "not a list")
    assert _snapshot(tmp_path) == before
