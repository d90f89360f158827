"""Safeguards: every video standin writes says that it is generated, in two independent ways.

1. An invisible watermark in the pixels of every frame, made and read by the `invisible-watermark` library
   (the one diffusers uses for SDXL), in two layers that carry the same 32-bit payload, WATERMARK_PAYLOAD
   ("SdIn", standin's code):
     - RivaGAN, a learned encoder/decoder whose ONNX weights ship inside the library's wheel (offline);
       it survives crops and frame-rate changes best;
     - DWT-DCT-SVD, a transform-domain mark; it survives re-encoding and (read back at twice the size) a
       0.5x resize best.
   A video is declared watermarked when either layer reads back at least DETECTION_BITS of the 32 bits
   (bits voted over 8 frames spread over the video). An unmarked video matches that many bits of a fixed code with
   probability 5.7e-5 per reading if its bits were coin flips; verify reads 4 ways (2 layers, as-is and
   2x), so under 2.3e-4: benchmarks/watermark_survival.py measures it on real and synthetic videos, and
   docs/responsible_use.md has the table, including where the mark does not survive (64x64 frames).
2. Provenance metadata in the container: generator, version, creation time, whether the watermark was
   written, plus what the caller knows (base model, adapter file hash, seed...), as mp4 metadata tags next
   to the human-readable `comment` label.
3. Where the c2pa-python package is installed, a C2PA manifest ("created by a trained algorithm", with the
   same provenance), signed offline with a local self-made certificate (see c2pa_credentials).

`standin verify VIDEO` reads all three back and prints JSON. Turning the watermark off takes an explicit
save_video(..., watermark=False), and the metadata says so.

Importing this module is cheap (numpy only); the watermark library (and with it cv2, torch, onnxruntime) is
imported when frames are marked or read.
"""

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

GENERATOR = "standin"
# 32 bits: RivaGAN's fixed payload size. ASCII "SdIn".
WATERMARK_PAYLOAD = b"SdIn"
WATERMARK_BITS = np.unpackbits(np.frombuffer(WATERMARK_PAYLOAD, dtype=np.uint8)).astype(np.uint8)
DETECTION_BITS = 27  # of 32: a layer that reads back at least this many bits of the payload detects it
WATERMARK_METHOD = "invisible-watermark rivaGan + dwtDctSvd"
# Below this many pixels on a side, frames are not marked (the transform layer needs 16x16 at least);
# the metadata then says the watermark was skipped and why.
MIN_WATERMARK_SIDE = 16
VERIFY_FRAMES = 8  # frames read by verify, evenly spaced
_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class WatermarkUnavailableError(RuntimeError):
    """The watermark library is not installed."""


# ---- watermark -------------------------------------------------------------------------------------------
def _library():
    try:
        from imwatermark.dwtDctSvd import EmbedDwtDctSvd
        from imwatermark.rivaGan import RivaWatermark
    except ImportError as e:
        raise WatermarkUnavailableError(
            f"the invisible watermark needs the `invisible-watermark` package ({e}); install it, or write "
            f"without a watermark explicitly with save_video(..., watermark=False)"
        ) from None
    RivaWatermark.loadModel()  # once per process: ONNX sessions on the model files inside the wheel
    return RivaWatermark, EmbedDwtDctSvd


def watermark_skip_reason(frames: np.ndarray) -> str | None:
    """Why frames [F, H, W, 3] cannot carry the watermark, or None."""
    height, width = frames.shape[1:3]
    if min(height, width) < MIN_WATERMARK_SIDE:
        return f"frames of {width}x{height} px are smaller than {MIN_WATERMARK_SIDE} px on a side"
    return None


def embed_watermark(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB frames [F, H, W, 3] with the payload in both layers of every frame (same shape and dtype)."""
    riva, svd = _library()
    marked = np.empty_like(frames)
    bits = WATERMARK_BITS.tolist()
    for index, frame in enumerate(frames):
        bgr = np.ascontiguousarray(frame[..., ::-1])
        bgr = riva(bits, len(bits)).encode(bgr)
        bgr = svd(bits, wmLen=len(bits)).encode(bgr)
        marked[index] = bgr[..., ::-1]
    return marked


def _layer_bits(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Each layer's bits voted over the frames (fraction of frames reading 1, per bit)."""
    riva, svd = _library()
    votes = {"rivagan": [], "dwtdctsvd": []}
    for frame in frames:
        bgr = np.ascontiguousarray(frame[..., ::-1])
        votes["rivagan"].append(riva([], 32).decode(bgr))
        with np.errstate(invalid="ignore"), _quiet_empty_mean():
            votes["dwtdctsvd"].append(svd([], wmLen=32).decode(bgr))
    return {name: np.mean(np.asarray(v, dtype=np.float64), axis=0) for name, v in votes.items()}


class _quiet_empty_mean:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


def chance_of_matching(matched: int, total: int = 32) -> float:
    """P(at least `matched` of `total` coin-flip bits equal a fixed code): how surprising a reading is."""
    return sum(math.comb(total, k) for k in range(matched, total + 1)) / 2.0**total


def detect_watermark(frames: np.ndarray) -> dict:
    """Read the payload from uint8 RGB frames [F, H, W, 3] (all of them: pass a sample for long videos).

    Each layer is read from the frames as they are and, unless found there, for frames under 512 px on their
    short side also resized 2x (a video shared at half size); the best reading of each layer counts. Returns the decision,
    each layer's bits, bit accuracy, matched bits and the chance that unmarked content matches as well.
    """
    import cv2

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    def twice(pixels):
        return np.stack([cv2.resize(f, (f.shape[1] * 2, f.shape[0] * 2), interpolation=cv2.INTER_CUBIC)
                         for f in pixels])

    readings = [("as-is", lambda: frames)]
    if min(frames.shape[1:3]) < 512:
        readings.append(("2x", lambda: twice(frames)))
    layers = {}
    for scale, make in readings:
        if any(layer["matched_bits"] >= DETECTION_BITS for layer in layers.values()):
            break  # found as-is: no second reading
        pixels = make()
        if watermark_skip_reason(pixels):
            continue
        for name, votes in _layer_bits(pixels).items():
            bits = (np.nan_to_num(votes, nan=0.5) > 0.5).astype(np.uint8)
            matched = int((bits == WATERMARK_BITS).sum())
            if name not in layers or matched > layers[name]["matched_bits"]:
                layers[name] = {
                    "bits": "".join(map(str, bits)), "payload_hex": np.packbits(bits).tobytes().hex(),
                    "matched_bits": matched, "bit_accuracy": round(matched / len(bits), 4),
                    "chance_if_unmarked": float(f"{chance_of_matching(matched, len(bits)):.3g}"),
                    "read_at": scale,
                }
    best = max(layers.values(), key=lambda layer: layer["matched_bits"], default=None)
    return {
        "detected": best is not None and best["matched_bits"] >= DETECTION_BITS,
        "expected_payload_hex": WATERMARK_PAYLOAD.hex(),
        "threshold_bits": f"{DETECTION_BITS}/{len(WATERMARK_BITS)}",
        "best_bit_accuracy": None if best is None else best["bit_accuracy"],
        "frames_read": int(len(frames)),
        "layers": layers,
        "method": WATERMARK_METHOD,
    }


# ---- provenance metadata ---------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def generation_provenance(base=None, adapter=None, adapter_low=None, seed=None, **extra) -> dict:
    """What a caller of save_video knows about a generation, as the `provenance=` dict: the base model (a
    folder or hub id, as given), the adapter files' SHA-256, the seed, and any further keys given."""
    record = {}
    if base is not None:
        record["base_model"] = str(base)
    for key, path in (("adapter", adapter), ("adapter_low", adapter_low)):
        if path is not None:
            record[f"{key}_file"] = Path(path).name
            record[f"{key}_sha256"] = file_sha256(path) if Path(path).is_file() else "not a local file"
    if seed is not None:
        record["seed"] = seed
    record.update(extra)
    return record


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("standin")
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        return "unknown"


def video_metadata(provenance: dict | None, watermark: str) -> dict[str, str]:
    """The tags save_video writes: the caller's provenance plus generator, version, time and watermark state.
    Keys are lower-case identifiers; values are flattened to one line."""
    tags = {
        "ai_generated": "true",
        "generator": GENERATOR,
        "generator_version": _version(),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "watermark": watermark,
    }
    for key, value in (provenance or {}).items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(f"provenance key {key!r}: use lower-case letters, digits and _ (at most 64)")
        if key in ("ai_generated", "generator", "watermark"):
            raise ValueError(f"provenance key {key!r} is written by save_video itself")
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        tags[key] = " ".join(str(text).split())[:2000]
    return tags


def metadata_arguments(tags: dict[str, str]) -> list[str]:
    """ffmpeg output arguments writing `tags` (mp4/mov keep arbitrary keys only with use_metadata_tags)."""
    arguments = ["-movflags", "+use_metadata_tags"]
    for key, value in tags.items():
        arguments += ["-metadata", f"{key}={value}"]
    return arguments


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The container's global metadata tags of a video file (through imageio-ffmpeg's ffmpeg)."""
    import imageio_ffmpeg

    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
        capture_output=True, text=True, errors="replace", timeout=120,
    )
    if result.returncode != 0:
        return {}
    tags, key, value, continued = {}, None, "", False
    for line in result.stdout.splitlines():
        if not continued:
            if line.startswith((";", "#")) or line.startswith("[") or "=" not in line:
                continue
            key, _, value = _split_unescaped(line)
        else:
            value += "\n" + line
        continued = value.endswith("\\") and not value.endswith("\\\\")
        if continued:
            value = value[:-1]
        else:
            tags[_unescape(key)] = _unescape(value)
    return tags


def _split_unescaped(line: str):
    index, escaped = 0, False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "=":
            return line[:index], "=", line[index + 1:]
    return line, "", ""


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


# ---- C2PA manifest (optional: the c2pa-python package) -------------------------------------------------------
# A C2PA manifest signed offline with a local, self-made certificate (an ES256 CA and a signer it issued,
# made on first use in STANDIN_C2PA_DIR or ~/.config/standin/c2pa). It binds the claim "created by a trained
# algorithm (standin)" and the provenance tags to the file's bytes; C2PA readers report it valid but its
# signer untrusted (no public CA vouches for a self-made certificate) unless they add the local CA as a trust
# anchor. Written into .mp4 and .mov files (ISO BMFF); Matroska is not a C2PA format.
C2PA_DIR_ENV = "STANDIN_C2PA_DIR"
C2PA_FORMATS = {".mp4": "video/mp4", ".mov": "video/quicktime"}
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
PROVENANCE_ASSERTION = "org.standin.provenance"


def c2pa_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("c2pa") is not None


def c2pa_folder() -> Path:
    return Path(os.environ.get(C2PA_DIR_ENV) or Path.home() / ".config" / "standin" / "c2pa")


def c2pa_credentials(folder: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(certificate chain PEM, signer private key PEM) in `folder`, made there first if missing."""
    folder = Path(folder) if folder is not None else c2pa_folder()
    chain, key = folder / "chain.pem", folder / "signer.key"
    if not (chain.is_file() and key.is_file()):
        make_c2pa_credentials(folder)
    return chain, key


def make_c2pa_credentials(folder: str | os.PathLike, days: int = 3650) -> None:
    """A self-made ES256 CA and a signing certificate it issues (digital signature, email-protection use, as
    C2PA requires of a signer), written to folder/ca.pem, chain.pem (signer + CA) and signer.key (0600)."""
    from datetime import timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)

    def name(common):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "standin (self-made, local)")])

    def usage(sign_certificates):
        return x509.KeyUsage(digital_signature=not sign_certificates, content_commitment=False,
                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                             key_cert_sign=sign_certificates, crl_sign=sign_certificates, encipher_only=False,
                             decipher_only=False)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("standin local C2PA CA")).issuer_name(name("standin local C2PA CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    signer = (x509.CertificateBuilder().subject_name(name("standin local C2PA signer")).issuer_name(ca.subject)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(usage(False), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "chain.pem").write_bytes(signer.public_bytes(pem) + ca.public_bytes(pem))
    key_path = folder / "signer.key"
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def c2pa_sign(source: str | os.PathLike, destination: str | os.PathLike, tags: dict[str, str], title: str) -> None:
    """Write `source` to `destination` with a C2PA manifest: created by a trained algorithm (standin), and
    the provenance tags as an assertion of their own."""
    import c2pa

    suffix = Path(title).suffix.lower()
    manifest = {
        "claim_generator_info": [{"name": GENERATOR, "version": tags.get("generator_version", "unknown")}],
        "title": title,
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [{
                "action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": {"name": GENERATOR, "version": tags.get("generator_version", "unknown")},
            }]}},
            {"label": PROVENANCE_ASSERTION, "data": dict(tags)},
        ],
    }
    chain, key = c2pa_credentials()
    info = c2pa.C2paSignerInfo(alg=b"es256", sign_cert=chain.read_bytes(), private_key=key.read_bytes(),
                               ta_url=None)  # no timestamp authority: offline
    signer = c2pa.Signer.from_info(info)
    try:
        with c2pa.Builder(json.dumps(manifest)) as builder, open(source, "rb") as src, \
                open(destination, "w+b") as dst:
            builder.sign(signer, C2PA_FORMATS[suffix], src, dst)
    finally:
        signer.close()


def read_c2pa(path: str | os.PathLike) -> dict:
    """The C2PA manifest of a file, summarised: present, validation state and codes, claim generator,
    actions with their digital source type, standin's provenance assertion."""
    if not c2pa_available():
        return {"present": None, "note": "c2pa-python is not installed: C2PA manifests not read"}
    import c2pa

    try:
        with c2pa.Reader(str(path)) as reader:
            store = json.loads(reader.json())
    except Exception as error:  # c2pa raises its own errors for "no manifest" and unsupported formats
        return {"present": False, "note": _last_line(error)}
    active = store.get("manifests", {}).get(store.get("active_manifest"), {})
    found = {"present": True, "validation_state": store.get("validation_state"),
             "validation_status": [item.get("code") for item in store.get("validation_status") or []],
             "claim_generator": [item.get("name") for item in active.get("claim_generator_info", [])],
             "signer": (active.get("signature_info") or {}).get("issuer")}
    for assertion in active.get("assertions", []):
        if assertion.get("label", "").startswith("c2pa.actions"):
            found["actions"] = [{"action": a.get("action"), "digitalSourceType": a.get("digitalSourceType")}
                                for a in assertion.get("data", {}).get("actions", [])]
        elif assertion.get("label") == PROVENANCE_ASSERTION:
            found["provenance"] = assertion.get("data")
    return found


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# ---- verify ------------------------------------------------------------------------------------------------
def verify(path: str | os.PathLike, frames: int = VERIFY_FRAMES) -> dict:
    """What a video file says about being generated: watermark reading and metadata (VideoReadError if the
    file is not a readable video)."""
    from standin.video import GENERATED_COMMENT, read_video_frames, video_frame_count

    count = video_frame_count(path)
    indices = np.unique(np.linspace(0, count - 1, min(frames, count)).round().astype(int))
    sample = read_video_frames(path, indices)
    pixels = np.stack([sample[i] for i in sorted(sample)])
    metadata = read_metadata(path)
    watermark = detect_watermark(pixels)
    manifest = read_c2pa(path)
    labelled = metadata.get("comment") == GENERATED_COMMENT or metadata.get("ai_generated") == "true" or any(
        action.get("digitalSourceType") == TRAINED_ALGORITHMIC_MEDIA for action in manifest.get("actions", []))
    if watermark["detected"] and labelled:
        verdict = "generated by standin: watermark and metadata found"
    elif watermark["detected"]:
        verdict = "generated by standin: watermark found (metadata stripped or rewritten)"
    elif labelled:
        verdict = f"labelled as generated by {metadata.get('generator', 'standin')} in its metadata; " + (
            "written without a watermark on purpose" if metadata.get("watermark", "").startswith("off")
            else "no watermark read")
    else:
        verdict = "no standin watermark or label found (this does not prove the video is not generated)"
    return {
        "video": str(path), "frames": count, "verdict": verdict, "watermark": watermark,
        "labelled_generated": labelled, "metadata": metadata, "c2pa": manifest,
    }


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify", help="check a video for standin's invisible watermark and provenance metadata (JSON)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("video")
    parser.add_argument("--frames", type=int, default=VERIFY_FRAMES, help="frames read, evenly spaced")
    parser.set_defaults(func=run_verify)


def run_verify(args) -> int:
    from standin.video import VideoReadError

    if args.frames < 1:
        print(f"error: --frames must be at least 1, got {args.frames}", file=sys.stderr)
        return 1
    try:
        report = verify(args.video, args.frames)
    except (VideoReadError, WatermarkUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0
