"""What an image file says about its own origin, read before the model runs: its C2PA manifest (validated by
c2pa-python), the IPTC digital source type in its XMP packet, and EXIF Software/Make/Model.

Runs in the worker's decode threads on untrusted bytes, so every reader here is bounded (segment and chunk
counts, XMP size, string lengths) and nothing raises: a broken manifest is evidence (`valid=False`), broken
XMP or EXIF is simply absent."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import zlib
from pathlib import Path
from typing import Any, NamedTuple
from xml.etree.ElementTree import Element, ParseError

import c2pa
from cryptography import x509
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring
from PIL import Image

from moderation.events import C2paEvidence, Provenance

log = logging.getLogger(__name__)

IPTC_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/"
DIGITAL_CAPTURE = IPTC_SOURCE_TYPE + "digitalCapture"
# What counts as a declaration that the image is not a record of a real scene, from the IPTC Digital Source
# Type vocabulary (cv.iptc.org/newscodes/digitalsourcetype):
# - trainedAlgorithmicMedia: made by a model trained on sampled content (generative AI), exactly our "fake";
# - compositeWithTrainedAlgorithmicMedia: generative AI edits of a capture (inpainting, outpainting,
#   generative fill), the manipulations the detector exists for;
# - algorithmicMedia: made purely by an algorithm with no sampled content (procedural, fractal); not AI, but
#   not a capture of anything either, so "fake" is the honest label.
# Left out, and shown to reviewers in digital_source_types all the same: compositeSynthetic (a composite with
# synthetic elements such as CGI or clip art, not necessarily generated and not necessarily deceptive: IPTC
# added compositeWithTrainedAlgorithmicMedia in 2023 precisely for the AI case), algorithmicallyEnhanced (a
# capture denoised, sharpened or upscaled: its content is real), digitalArt, dataDrivenMedia, virtualRecording,
# screenCapture and the capture/digitised-film types.
AI_SOURCE_TYPES = frozenset(
    IPTC_SOURCE_TYPE + term
    for term in ("trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia", "algorithmicMedia")
)

IPTC_EXT_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_SOURCE_TYPE_TAG = f"{{{IPTC_EXT_NS}}}DigitalSourceType"
_RDF_RESOURCE = f"{{{RDF_NS}}}resource"

# A real XMP packet is a few KB (a JPEG segment holds at most 64 KB); Photoshop history can reach a few
# hundred KB. Past this we do not parse at all.
MAX_XMP_BYTES = 1 << 20
MAX_TEXT = 256  # any string copied from the file into the verdict
MAX_ITEMS = 16  # digitalSourceTypes and error codes kept
MAX_JPEG_SEGMENTS = 4096
MAX_PNG_CHUNKS = 20_000  # a 30 MB PNG in 8 KB IDAT chunks has ~4,000; chunks past the cap go unread
# Ingredients are followed this many manifests deep (a parent, its parents...) and this many in all: a store
# is the uploader's, and a cycle or a fan of thousands of ingredients must not cost more than a few.
MAX_INGREDIENT_DEPTH = 8
MAX_INGREDIENTS = 64

EXIF_SOFTWARE, EXIF_MAKE, EXIF_MODEL = 0x0131, 0x010F, 0x0110
_JPEG_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_JPEG_EXIF = b"Exif\x00\x00"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_XMP_KEYWORD = b"XML:com.adobe.xmp\x00"

# Pillow format -> the MIME type c2pa reads it as; formats c2pa cannot carry a manifest in are absent.
C2PA_MIME = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "TIFF": "image/tiff",
    "HEIF": "image/heif",
    "AVIF": "image/avif",
}
# c2pa is asked only when the file may hold a manifest store (~0.7 ms saved a plain 1 MP JPEG): a JPEG APP11
# segment, a PNG caBX chunk, or elsewhere the JUMBF superbox label "c2pa" that every embedded store carries.
_MANIFEST_STORE_LABEL = b"c2pa"
# Remote manifests and OCSP would make the worker fetch URLs chosen by the uploader: never.
_VERIFY = {"remote_manifest_fetch": False, "ocsp_fetch": False}
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----")

UNREADABLE = "moderation.manifestUnreadable"  # our codes next to c2pa's own (assertion.dataHash.mismatch...)
INTERNAL_ERROR = "moderation.internalError"


def read_provenance(data: bytes, fmt: str) -> Provenance | None:
    """The file's own claims about its origin, or None when it makes none. `fmt` is Pillow's format name.

    `declares_ai` is set by any AI digitalSourceType (AI_SOURCE_TYPES) in the active C2PA manifest's actions
    or in the XMP Iptc4xmpExt:DigitalSourceType, and an INVALID manifest's AI claim still counts: a broken
    signature or a tampered image no longer proves who made it, but it remains the file declaring itself
    AI-made, and nobody forges a manifest to make their image look generated. `declares_capture` needs a
    VALID manifest (signature and hashes check out; Valid or Trusted) declaring digitalCapture, and is
    evidence for reviewers, never a verdict. Never raises."""
    embedded = _embedded(data, fmt)
    evidence = read_c2pa(data, fmt) if embedded.manifest else None
    iptc = iptc_digital_source_type(embedded.xmp)
    software, make, model = _exif_fields(embedded.exif)
    if evidence is None and iptc is None and software is None and make is None and model is None:
        return None
    c2pa_types = evidence.digital_source_types if evidence else []
    return Provenance(
        c2pa=evidence,
        iptc_digital_source_type=iptc,
        exif_software=software,
        exif_make=make,
        exif_model=model,
        declares_ai=any(map(_declares_ai, [*c2pa_types, iptc or ""])),
        declares_capture=bool(evidence and evidence.valid and DIGITAL_CAPTURE in map(_canonical, c2pa_types)),
        ingredient_declares_ai=bool(evidence and any(map(_declares_ai, evidence.ingredient_source_types))),
    )


def _declares_ai(kind: str) -> bool:
    return _canonical(kind) in AI_SOURCE_TYPES


def read_c2pa(data: bytes, fmt: str) -> C2paEvidence | None:
    """The C2PA manifest store's evidence, None without one; an unreadable store is invalid evidence."""
    mime = C2PA_MIME.get(fmt)
    if mime is None:
        return None
    try:
        with c2pa.Reader(mime, io.BytesIO(data), context=_reader_context()) as reader:
            store = json.loads(reader.json())
        return evidence_from_store(store)
    except c2pa.C2paError.ManifestNotFound:
        return None
    except c2pa.C2paError as error:
        # c2pa's own verdict on a malformed file (truncated JUMBF, bad CBOR, a container it cannot parse).
        kind = type(error).__name__.removeprefix("_C2pa")
        return C2paEvidence(validation_state="Invalid", valid=False, errors=[f"{UNREADABLE}.{kind}"])
    except Exception as error:  # a bug in c2pa or in our reading of its JSON: evidence of it, not a crash
        _log_once(f"c2pa {type(error).__name__}", "c2pa failed reading a manifest store (%s: %s)", error)
        return C2paEvidence(validation_state="Invalid", valid=False, errors=[INTERNAL_ERROR])


def evidence_from_store(store: dict[str, Any]) -> C2paEvidence:
    """C2paEvidence from c2pa's manifest store JSON (Reader.json())."""
    state = str(store.get("validation_state") or "Invalid")
    valid = state in ("Valid", "Trusted")
    manifests = store.get("manifests") or {}
    manifest = manifests.get(store.get("active_manifest")) or {}
    return C2paEvidence(
        validation_state=state,
        valid=valid,
        claim_generator=_claim_generator(manifest),
        signer=_text((manifest.get("signature_info") or {}).get("issuer")),
        digital_source_types=_action_source_types(manifest),
        errors=[] if valid else _failure_codes(store),
        ingredient_source_types=_ingredient_source_types(manifest, manifests),
    )


def _ingredient_source_types(manifest: dict[str, Any], manifests: dict[str, Any]) -> list[str]:
    """The digitalSourceTypes declared by the manifests of a manifest's ingredients, breadth first, each
    manifest read once, within MAX_INGREDIENT_DEPTH and MAX_INGREDIENTS. An ingredient without a manifest of
    its own (a plain file placed in the image) declares nothing."""
    kinds: list[str] = []
    seen: set[str] = set()
    level = [manifest]
    for _ in range(MAX_INGREDIENT_DEPTH):
        parents = []
        for child in level:
            for label in _ingredient_manifests(child):
                if label in seen or len(seen) >= MAX_INGREDIENTS or not isinstance(manifests.get(label), dict):
                    continue
                seen.add(label)
                parents.append(manifests[label])
                kinds += [kind for kind in _action_source_types(manifests[label]) if kind not in kinds]
        level = parents
    return kinds[:MAX_ITEMS]


def _ingredient_manifests(manifest: dict[str, Any]) -> list[str]:
    ingredients = manifest.get("ingredients") or []
    labels = [i.get("active_manifest") for i in ingredients[:MAX_INGREDIENTS] if isinstance(i, dict)]
    return [label for label in labels if isinstance(label, str)]


def _claim_generator(manifest: dict[str, Any]) -> str | None:
    """v1 claims carry a claim_generator string; v2 claims only claim_generator_info [{name, version}]."""
    if generator := manifest.get("claim_generator"):
        return _text(generator)
    names = [
        "/".join(str(info[key]) for key in ("name", "version") if info.get(key))
        for info in manifest.get("claim_generator_info") or []
        if isinstance(info, dict)
    ]
    return _text(" ".join(name for name in names if name))


def _action_source_types(manifest: dict[str, Any]) -> list[str]:
    kinds: list[str] = []
    for assertion in manifest.get("assertions") or []:
        if not isinstance(assertion, dict) or assertion.get("label") not in ("c2pa.actions", "c2pa.actions.v2"):
            continue
        for action in (assertion.get("data") or {}).get("actions") or []:
            kind = _text(action.get("digitalSourceType")) if isinstance(action, dict) else None
            if kind and kind not in kinds:
                kinds.append(kind)
    return kinds[:MAX_ITEMS]


def _failure_codes(store: dict[str, Any]) -> list[str]:
    results = (store.get("validation_results") or {}).get("activeManifest") or {}
    failures = results.get("failure") or store.get("validation_status") or []
    codes = [str(failure.get("code")) for failure in failures if isinstance(failure, dict)]
    return list(dict.fromkeys(codes))[:MAX_ITEMS] or ["moderation.invalidWithoutCode"]


def trust_anchors(path: Path) -> str:
    """The PEM certificates of a trust-anchor file, as c2pa takes them. The C2PA conformance trust list is a PEM
    bundle with each certificate's subject and issuer as text around it: only the certificates are kept, and
    each must parse. ValueError for a file with none or with one that does not parse."""
    blocks = _PEM_CERTIFICATE.findall(path.read_bytes())
    if not blocks:
        raise ValueError(f"{path}: no PEM certificate (MODERATION_C2PA_TRUST_ANCHORS)")
    for block in blocks:
        x509.load_pem_x509_certificate(block)  # ValueError names what is wrong with it
    return "\n".join(block.decode("ascii") for block in blocks) + "\n"


_context_lock = threading.Lock()
_context: tuple[int, c2pa.Context] | None = None
_reader_settings: dict[str, Any] = {"verify": _VERIFY}


def use_trust_anchors(pem: str | None) -> None:
    """Read every manifest from now on against these anchors (None: no trust list, Valid at best). Called once
    at start, before the decode threads read anything."""
    global _context, _reader_settings
    with _context_lock:
        _reader_settings = {"verify": _VERIFY} | ({"trust": {"trust_anchors": pem}} if pem else {})
        _context = None


def _reader_context() -> c2pa.Context:
    """One Context for every Reader in this process (readers share it safely across threads); rebuilt after
    a fork, whose child cannot use the parent's native handle."""
    global _context
    with _context_lock:
        if _context is None or _context[0] != os.getpid():
            _context = (os.getpid(), c2pa.Context.from_dict(_reader_settings))
        return _context[1]


def iptc_digital_source_type(xmp: bytes | None) -> str | None:
    """Iptc4xmpExt:DigitalSourceType from an XMP packet, in any of its RDF forms: an attribute of
    rdf:Description, an element's text, or an element's rdf:resource. No DTD, no entities, at most
    MAX_XMP_BYTES: anything else reads as absent."""
    if not xmp or len(xmp) > MAX_XMP_BYTES:
        return None
    try:
        root = fromstring(xmp.rstrip(b"\x00 \t\r\n"), forbid_dtd=True)
    except (ParseError, DefusedXmlException, ValueError):
        return None
    return next(filter(None, map(_source_type_of, root.iter())), None)


def _source_type_of(element: Element) -> str | None:
    if value := element.get(_SOURCE_TYPE_TAG):
        return _text(value)
    if element.tag == _SOURCE_TYPE_TAG:
        return _text(element.get(_RDF_RESOURCE) or element.text)
    return None


class _Embedded(NamedTuple):
    """What a pass over the file's header (or chunks) found: whether a C2PA store may be there, XMP, EXIF."""

    manifest: bool
    xmp: bytes | None = None
    exif: bytes | Image.Exif | None = None


def _embedded(data: bytes, fmt: str) -> _Embedded:
    """JPEG and PNG are walked here (Pillow would miss a PNG's metadata after its image data, and decode the
    whole image to find its EXIF); other formats through Pillow's header parse."""
    try:
        if fmt in ("JPEG", "MPO"):
            return _jpeg_metadata(data)
        if fmt == "PNG":
            return _png_metadata(data)
        return _pillow_metadata(data, fmt)
    except Exception as error:  # hostile metadata is common and never worth a dead letter: read as absent
        _log_once(f"metadata {fmt} {type(error).__name__}", "unreadable image metadata (%s: %s)", error)
        return _Embedded(manifest=_MANIFEST_STORE_LABEL in data)


def _jpeg_metadata(data: bytes) -> _Embedded:
    """The header segments before the first scan: APP11 (JUMBF, where C2PA lives), the first XMP and EXIF APP1."""
    manifest, xmp, exif = False, None, None
    position = 2 if data.startswith(b"\xff\xd8") else len(data)
    for _ in range(MAX_JPEG_SEGMENTS):
        if position + 4 > len(data) or data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image: no metadata past here
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        body, end = position + 4, position + 2 + length
        if marker == 0xEB:
            manifest = True
        elif marker == 0xE1 and xmp is None and data.startswith(_JPEG_XMP, body):
            xmp = data[body + len(_JPEG_XMP) : end]
        elif marker == 0xE1 and exif is None and data.startswith(_JPEG_EXIF, body):
            exif = data[body + len(_JPEG_EXIF) : end]
        position = max(end, position + 4)
    return _Embedded(manifest, xmp, exif)


def _png_metadata(data: bytes) -> _Embedded:
    """Every chunk up to IEND, skipped by its length: caBX (C2PA), the XMP iTXt and eXIf, wherever they are."""
    manifest, xmp, exif = False, None, None
    position = len(_PNG_SIGNATURE) if data.startswith(_PNG_SIGNATURE) else len(data)
    for _ in range(MAX_PNG_CHUNKS):
        if position + 8 > len(data):
            break
        length = int.from_bytes(data[position : position + 4], "big")
        kind, start, end = data[position + 4 : position + 8], position + 8, position + 8 + length
        if kind == b"IEND":
            break
        if kind == b"caBX":
            manifest = True  # even cut short: c2pa says what is wrong with it
        elif kind == b"iTXt" and xmp is None and end <= len(data) and data.startswith(_PNG_XMP_KEYWORD, start):
            xmp = _itxt_text(data[start:end])
        elif kind == b"eXIf" and exif is None and end <= len(data):
            exif = data[start:end]
        position = end + 4
    return _Embedded(manifest, xmp, exif)


def _itxt_text(chunk: bytes) -> bytes | None:
    """An iTXt chunk's text: keyword\\0, compression flag and method, language\\0, translated keyword\\0."""
    keyword_end = chunk.find(b"\x00")
    if keyword_end < 0 or len(chunk) < keyword_end + 3:
        return None
    compressed = chunk[keyword_end + 1] == 1
    language_end = chunk.find(b"\x00", keyword_end + 3)
    translated_end = chunk.find(b"\x00", language_end + 1) if language_end >= 0 else -1
    if translated_end < 0:
        return None
    text = chunk[translated_end + 1 :]
    if not compressed:
        return text
    inflated = zlib.decompressobj().decompress(text, MAX_XMP_BYTES + 1)  # a zip bomb stops at the cap
    return inflated if len(inflated) <= MAX_XMP_BYTES else None


def _pillow_metadata(data: bytes, fmt: str) -> _Embedded:
    """WebP, TIFF, GIF, HEIF...: Pillow reads their metadata while parsing the header."""
    manifest = C2PA_MIME.get(fmt) is not None and _MANIFEST_STORE_LABEL in data
    with Image.open(io.BytesIO(data), formats=[fmt]) as image:
        xmp = image.info.get("xmp")
        return _Embedded(manifest, xmp if isinstance(xmp, bytes) else None, image.getexif())


def _exif_fields(exif: bytes | Image.Exif | None) -> tuple[str | None, str | None, str | None]:
    if isinstance(exif, bytes):
        loaded = Image.Exif()
        try:
            loaded.load(exif)
        except Exception:  # malformed EXIF is common: Pillow raises a handful of kinds, none of them news
            return None, None, None
        exif = loaded
    if not exif:
        return None, None, None
    return _text(exif.get(EXIF_SOFTWARE)), _text(exif.get(EXIF_MAKE)), _text(exif.get(EXIF_MODEL))


def _text(value: object) -> str | None:
    """A string from the file, as the verdict may carry it: printable, trimmed, at most MAX_TEXT characters."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    text = "".join(char for char in value[: MAX_TEXT * 4] if char.isprintable()).strip()
    return text[:MAX_TEXT] or None


def _canonical(kind: str) -> str:
    """A digitalSourceType as the IPTC URI: tools also write it with https:// or as the bare term."""
    if kind.startswith("https://cv.iptc.org/newscodes/digitalsourcetype/"):
        return "http" + kind.removeprefix("https")
    return kind if "/" in kind or not kind else IPTC_SOURCE_TYPE + kind


_logged: set[str] = set()


def _log_once(key: str, message: str, error: Exception) -> None:
    """A fault that repeats on every such image is logged the first time, not once per upload."""
    if key not in _logged:
        _logged.add(key)
        log.warning(message, type(error).__name__, error, exc_info=error)
