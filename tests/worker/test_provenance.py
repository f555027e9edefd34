"""Provenance evidence from real files: C2PA manifests signed by c2pa-python with a test CA made by the devkit,
IPTC XMP written into JPEG and PNG, EXIF written by Pillow, tampered and hostile copies that never raise."""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import c2pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from moderation.devkit import hostile_images
from moderation.devkit import provenance_samples as samples
from moderation.devkit.provenance_samples import (
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    DIGITAL_CAPTURE,
    TRAINED_ALGORITHMIC_MEDIA,
)
from moderation.events import Provenance
from moderation.worker import provenance
from moderation.worker.provenance import (
    IPTC_SOURCE_TYPE,
    MAX_TEXT,
    MAX_XMP_BYTES,
    evidence_from_store,
    read_provenance,
)

SIGNABLE = ["JPEG", "PNG", "WEBP"]


@functools.cache
def plain(fmt: str) -> bytes:
    return samples.sample_image(fmt)


@functools.cache
def signed(fmt: str, source_type: str = TRAINED_ALGORITHMIC_MEDIA) -> bytes:
    return samples.signed(plain(fmt), fmt, source_type)


def read(data: bytes, fmt: str) -> Provenance:
    result = read_provenance(data, fmt)
    assert result is not None
    return result


@pytest.mark.parametrize("fmt", SIGNABLE)
def test_a_signed_ai_manifest_is_valid_evidence_that_declares_ai(fmt: str) -> None:
    found = read(signed(fmt), fmt)
    assert found.c2pa is not None
    assert found.c2pa.validation_state == "Valid"  # the test CA is on no trust list: Valid, not Trusted
    assert found.c2pa.valid and found.c2pa.errors == []
    assert found.c2pa.claim_generator == samples.GENERATOR
    assert found.c2pa.signer == "moderation test CA"
    assert found.c2pa.digital_source_types == [TRAINED_ALGORITHMIC_MEDIA]
    assert found.declares_ai and not found.declares_capture
    Image.open(io.BytesIO(signed(fmt))).load()  # still an ordinary image


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_valid_capture_manifest_declares_capture_and_not_ai(fmt: str) -> None:
    found = read(signed(fmt, DIGITAL_CAPTURE), fmt)
    assert found.c2pa is not None and found.c2pa.valid
    assert found.c2pa.digital_source_types == [DIGITAL_CAPTURE]
    assert found.declares_capture and not found.declares_ai


def test_the_test_chain_is_trusted_once_its_ca_is_an_anchor() -> None:
    """The devkit's chain is well formed: c2pa trusts it given the CA, so `Valid` above means untrusted only."""
    anchors = {"trust": {"user_anchors": samples.test_credentials().ca_pem.decode()}}
    settings_ = {"verify": {"remote_manifest_fetch": False}, **anchors}
    with (
        c2pa.Context.from_dict(settings_) as context,
        c2pa.Reader("image/jpeg", io.BytesIO(signed("JPEG")), context=context) as reader,
    ):
        assert json.loads(reader.json())["validation_state"] == "Trusted"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_ai_parent_composited_into_a_camera_capture_is_its_own_evidence(fmt: str) -> None:
    """The child's own manifest says digitalCapture; its ingredient's, carried in the store, says generated."""
    child = samples.signed(
        samples.sample_image(fmt, (200, 150), seed=2), fmt, DIGITAL_CAPTURE, ingredients=(signed(fmt),)
    )
    found = read(child, fmt)
    assert found.c2pa is not None and found.c2pa.valid
    assert found.c2pa.digital_source_types == [DIGITAL_CAPTURE]
    assert found.c2pa.ingredient_source_types == [TRAINED_ALGORITHMIC_MEDIA]
    assert found.ingredient_declares_ai and not found.declares_ai and found.declares_capture
    # Two generations down (the composite composited again) it is still found; a plain ingredient adds nothing.
    grandchild = samples.signed(plain(fmt), fmt, DIGITAL_CAPTURE, ingredients=(plain(fmt), child))
    found = read(grandchild, fmt)
    assert found.c2pa is not None and found.c2pa.ingredient_source_types == [DIGITAL_CAPTURE, TRAINED_ALGORITHMIC_MEDIA]
    assert found.ingredient_declares_ai
    camera_only = read(samples.signed(plain(fmt), fmt, DIGITAL_CAPTURE, ingredients=(plain(fmt),)), fmt)
    assert camera_only.c2pa is not None and camera_only.c2pa.ingredient_source_types == []
    assert not camera_only.ingredient_declares_ai


def test_ingredients_are_followed_within_their_bounds() -> None:
    """A hostile store: a cycle of ingredients, and a chain deeper than MAX_INGREDIENT_DEPTH."""
    ai = {
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [{"digitalSourceType": TRAINED_ALGORITHMIC_MEDIA}]}}
        ]
    }

    def store(manifests: dict[str, dict]) -> dict:  # type: ignore[type-arg]
        return {"validation_state": "Valid", "active_manifest": "m0", "manifests": manifests}

    cycle = {"m0": {"ingredients": [{"active_manifest": "m1"}]}, "m1": {"ingredients": [{"active_manifest": "m0"}]}}
    assert evidence_from_store(store(cycle)).ingredient_source_types == []
    depth = provenance.MAX_INGREDIENT_DEPTH
    chain = {f"m{i}": {"ingredients": [{"active_manifest": f"m{i + 1}"}]} for i in range(depth + 1)}
    assert evidence_from_store(store(chain | {f"m{depth}": ai})).ingredient_source_types == [TRAINED_ALGORITHMIC_MEDIA]
    assert evidence_from_store(store(chain | {f"m{depth + 1}": ai})).ingredient_source_types == []


@pytest.fixture
def trust_list(tmp_path):  # type: ignore[no-untyped-def]
    """A trust list in the C2PA conformance list's form (PEM certificates with their names as text around
    them) naming the devkit's CA; the reader goes back to no trust list afterwards."""
    ca = samples.test_credentials().ca_pem.decode()
    path = tmp_path / "C2PA-TRUST-LIST.pem"
    path.write_text(f"# moderation test root CA\nSubject: O=moderation test CA\n{ca}\n# end of list\n")
    provenance.use_trust_anchors(provenance.trust_anchors(path))
    yield path
    provenance.use_trust_anchors(None)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_listed_anchors_signer_reads_trusted_and_any_other_valid(trust_list, fmt: str) -> None:  # type: ignore[no-untyped-def]
    trusted = read(signed(fmt), fmt)
    assert trusted.c2pa is not None and trusted.c2pa.validation_state == "Trusted" and trusted.c2pa.valid
    other = samples.signed(plain(fmt), fmt, TRAINED_ALGORITHMIC_MEDIA, credentials=samples.test_credentials("other"))
    untrusted = read(other, fmt)
    assert untrusted.c2pa is not None and untrusted.c2pa.validation_state == "Valid"
    assert untrusted.c2pa.signer == "other test CA" and untrusted.declares_ai


def test_a_trust_list_without_a_readable_certificate_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    empty = tmp_path / "empty.pem"
    empty.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="no PEM certificate"):
        provenance.trust_anchors(empty)
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError):
        provenance.trust_anchors(broken)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_pixels_changed_after_signing_read_as_invalid_and_still_declare_ai(fmt: str) -> None:
    edited = samples.tampered(signed(fmt), fmt)
    Image.open(io.BytesIO(edited)).load()  # a plausible edit: the file still decodes
    found = read(edited, fmt)
    assert found.c2pa is not None
    assert found.c2pa.validation_state == "Invalid" and not found.c2pa.valid
    assert "assertion.dataHash.mismatch" in found.c2pa.errors
    assert found.declares_ai  # an invalid manifest's AI claim is still the file declaring itself AI-made


def test_a_tampered_capture_manifest_declares_no_capture() -> None:
    found = read(samples.tampered(signed("JPEG", DIGITAL_CAPTURE), "JPEG"), "JPEG")
    assert found.c2pa is not None and not found.c2pa.valid
    assert not found.declares_capture and not found.declares_ai


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("form", ["attribute", "element", "resource"])
def test_iptc_digital_source_type_in_xmp(fmt: str, form: str) -> None:
    tagged = samples.iptc_tagged(plain(fmt), fmt, COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA, form=form)
    Image.open(io.BytesIO(tagged)).load()
    found = read(tagged, fmt)
    assert found.iptc_digital_source_type == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    assert found.declares_ai and found.c2pa is None


def test_a_compressed_png_xmp_chunk_is_read() -> None:
    xmp = samples.xmp_packet(TRAINED_ALGORITHMIC_MEDIA)
    found = read(samples.with_xmp(plain("PNG"), "PNG", xmp, compressed=True), "PNG")
    assert found.iptc_digital_source_type == TRAINED_ALGORITHMIC_MEDIA


def xmp_chunk(source_type: str) -> bytes:
    return hostile_images.png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + samples.xmp_packet(source_type))


def test_xmp_after_the_png_image_data_is_read() -> None:
    data = plain("PNG")
    end = data.rindex(b"IEND") - 4
    assert read(data[:end] + xmp_chunk(TRAINED_ALGORITHMIC_MEDIA) + data[end:], "PNG").declares_ai


@pytest.mark.parametrize(
    ("value", "declares_ai"),
    [
        (IPTC_SOURCE_TYPE + "trainedAlgorithmicMedia", True),
        (IPTC_SOURCE_TYPE + "algorithmicMedia", True),
        ("https://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia", True),
        ("trainedAlgorithmicMedia", True),
        (IPTC_SOURCE_TYPE + "compositeSynthetic", False),
        (IPTC_SOURCE_TYPE + "algorithmicallyEnhanced", False),
        (IPTC_SOURCE_TYPE + "digitalArt", False),
        ("https://example.com/vocabulary/trainedAlgorithmicMedia", False),
    ],
)
def test_which_source_types_declare_ai(value: str, declares_ai: bool) -> None:
    found = read(samples.iptc_tagged(plain("JPEG"), "JPEG", value), "JPEG")
    assert found.iptc_digital_source_type == value
    assert found.declares_ai is declares_ai


def test_an_unsigned_capture_claim_is_shown_but_declares_nothing() -> None:
    found = read(samples.iptc_tagged(plain("PNG"), "PNG", DIGITAL_CAPTURE), "PNG")
    assert found.iptc_digital_source_type == DIGITAL_CAPTURE
    assert not found.declares_capture and not found.declares_ai


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_software_make_and_model(fmt: str) -> None:
    data = samples.with_exif(fmt, software="Adobe Firefly 3", make="Canon", model="EOS R5")
    found = read(data, fmt)
    assert (found.exif_software, found.exif_make, found.exif_model) == ("Adobe Firefly 3", "Canon", "EOS R5")
    assert not found.declares_ai and found.c2pa is None


def test_everything_at_once() -> None:
    data = samples.with_exif("JPEG", software="Midjourney", make="", model="")
    data = samples.signed(samples.iptc_tagged(data, "JPEG", TRAINED_ALGORITHMIC_MEDIA), "JPEG", DIGITAL_CAPTURE)
    found = read(data, "JPEG")
    assert found.c2pa is not None and found.c2pa.valid
    assert found.iptc_digital_source_type == TRAINED_ALGORITHMIC_MEDIA and found.exif_software == "Midjourney"
    assert found.declares_ai and found.declares_capture  # both shown; policy lets the AI declaration decide


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_a_plain_image_says_nothing(fmt: str) -> None:
    assert read_provenance(plain(fmt), fmt) is None


# Hostile inputs: each one answers None or evidence, never an exception.


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_manifests_are_invalid_evidence(fmt: str) -> None:
    data = signed(fmt)
    store = data.index(b"c2pa")
    for cut in (store + 8, store + 200, store + 1000, len(data) - 10):
        found = read_provenance(data[:cut], fmt)
        assert found is not None and found.c2pa is not None, cut
        assert not found.c2pa.valid and found.c2pa.errors, cut


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_garbled_manifest_is_invalid_evidence(fmt: str) -> None:
    data = bytearray(signed(fmt))
    store = data.index(b"c2pa")
    data[store + 100 : store + 140] = os.urandom(40)
    found = read(bytes(data), fmt)
    assert found.c2pa is not None and not found.c2pa.valid
    assert found.c2pa.errors


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(["JPEG", "PNG"]), at=st.floats(0, 1), junk=st.binary(min_size=1, max_size=64))
def test_signed_files_with_bytes_overwritten_never_raise(fmt: str, at: float, junk: bytes) -> None:
    data = signed(fmt)
    position = int(at * (len(data) - 1))
    found = read_provenance(data[:position] + junk + data[position + len(junk) :], fmt)
    assert found is None or isinstance(found, Provenance)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "HEIF", "AVIF", "BMP", "XYZ"])
@pytest.mark.parametrize("data", [b"", b"c2pa", os.urandom(4096) + b"c2pa" + os.urandom(4096)])
def test_random_bytes_never_raise(fmt: str, data: bytes) -> None:
    found = read_provenance(data, fmt)
    assert found is None or (found.c2pa is not None and not found.c2pa.valid)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_random_bytes_in_the_xmp_read_as_absent(fmt: str) -> None:
    assert read_provenance(samples.with_xmp(plain(fmt), fmt, os.urandom(3000)), fmt) is None


def test_a_10_mb_xmp_packet_is_not_parsed() -> None:
    padding = b" " * (10 * 1024 * 1024)
    xmp = samples.xmp_packet(TRAINED_ALGORITHMIC_MEDIA).replace(b"</x:xmpmeta>", b"</x:xmpmeta>" + padding)
    assert len(xmp) > MAX_XMP_BYTES
    assert read_provenance(samples.with_xmp(plain("PNG"), "PNG", xmp), "PNG") is None
    # Compressed to a few KB, it inflates only up to the cap.
    assert read_provenance(samples.with_xmp(plain("PNG"), "PNG", xmp, compressed=True), "PNG") is None


@pytest.mark.parametrize(
    "doctype",
    [
        '<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>',  # entity expansion
        '<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>',  # external entity
    ],
)
def test_xmp_with_a_dtd_is_refused(doctype: str) -> None:
    xmp = samples.xmp_packet("&b;").replace(b"<x:xmpmeta", doctype.encode() + b"<x:xmpmeta")
    assert read_provenance(samples.with_xmp(plain("JPEG"), "JPEG", xmp), "JPEG") is None


def test_files_of_countless_chunks_and_segments_are_read_within_bounds() -> None:
    many_chunks = hostile_images.png_with_private_chunks(200_000, after_data=True)
    tagged = samples.iptc_tagged(many_chunks, "PNG", TRAINED_ALGORITHMIC_MEDIA)
    assert read(tagged, "PNG").declares_ai  # before the private chunks: found
    late = many_chunks[:-12] + xmp_chunk(TRAINED_ALGORITHMIC_MEDIA) + many_chunks[-12:]
    assert read_provenance(late, "PNG") is None  # past MAX_PNG_CHUNKS: not looked at
    data = plain("JPEG")
    comments = b"\xff\xfe\x00\x02" * 100_000
    assert read_provenance(data[:2] + comments + data[2:], "JPEG") is None


def test_garbage_exif_reads_as_absent() -> None:
    data = plain("JPEG")
    segment = b"\xff\xe1" + (2 + 6 + 200).to_bytes(2, "big") + b"Exif\x00\x00" + os.urandom(200)
    assert read_provenance(data[:2] + segment + data[2:], "JPEG") is None
    png = plain("PNG")
    chunk_data = b"MM\x00*" + os.urandom(100)
    chunk = len(chunk_data).to_bytes(4, "big") + b"eXIf" + chunk_data
    chunk += zlib.crc32(b"eXIf" + chunk_data).to_bytes(4, "big")
    assert read_provenance(png[:33] + chunk + png[33:], "PNG") is None


def test_strings_from_the_file_are_bounded_and_printable() -> None:
    found = read(samples.with_exif("JPEG", software="\x07Gen" + "x" * 5000, make="Canon\x00"), "JPEG")
    assert found.exif_software is not None and len(found.exif_software) == MAX_TEXT
    assert found.exif_software.startswith("Genxx") and found.exif_make == "Canon"


def test_a_fault_inside_c2pa_is_evidence_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_reader(*args: object, **kwargs: object) -> None:
        raise RuntimeError("native library fault")

    monkeypatch.setattr(provenance.c2pa, "Reader", broken_reader)
    monkeypatch.setattr(provenance, "_logged", set())
    with caplog.at_level(logging.WARNING, logger=provenance.__name__):
        results = [read(signed("JPEG"), "JPEG") for _ in range(3)]
    assert all(r.c2pa and r.c2pa.errors == [provenance.INTERNAL_ERROR] and not r.c2pa.valid for r in results)
    assert len(caplog.records) == 1


def test_reading_from_many_threads_gives_the_same_evidence() -> None:
    files = [(signed("JPEG"), "JPEG"), (signed("PNG", DIGITAL_CAPTURE), "PNG"), (plain("JPEG"), "JPEG")]
    expected = [read_provenance(data, fmt) for data, fmt in files]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda item: read_provenance(*item), files * 20))
    assert results == expected * 20


# c2pa's store JSON, as other signers write it.


def test_a_v1_claim_with_actions_and_claim_generator() -> None:
    store = {
        "active_manifest": "urn:a",
        "validation_state": "Trusted",
        "manifests": {
            "urn:a": {
                "claim_generator": "Adobe_Firefly c2pa-rs/0.25",
                "signature_info": {"issuer": "Adobe Inc."},
                "assertions": [
                    {"label": "c2pa.actions", "data": {"actions": [{"action": "c2pa.created"}]}},
                    {
                        "label": "c2pa.actions",
                        "data": {"actions": [{"action": "c2pa.edited", "digitalSourceType": "bogus"}, "junk"]},
                    },
                    "junk",
                ],
            }
        },
    }
    evidence = evidence_from_store(store)
    assert evidence.valid and evidence.claim_generator == "Adobe_Firefly c2pa-rs/0.25"
    assert evidence.signer == "Adobe Inc." and evidence.digital_source_types == ["bogus"]


def test_an_invalid_store_without_failure_codes_still_says_why() -> None:
    evidence = evidence_from_store({"validation_state": "Invalid"})
    assert not evidence.valid and evidence.errors == ["moderation.invalidWithoutCode"]
    assert evidence.claim_generator is None and evidence.digital_source_types == []
